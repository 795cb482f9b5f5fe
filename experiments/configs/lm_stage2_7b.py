"""MiMo-Audio-7B stage 2 (understanding + generation): all parameters, loss weights
100-12-8-6-4-2-2-1-1, delay pattern 0-1-...-7, text-guided 5:5 interleaving, cosine LR 2e-4 (patch
encoder and decoder) / 3e-5 (LLM), batch 16.8M groups (2048 rows of 8192), 5T tokens, warmup
0.01."""

from experiments.configs import common


def get_config(arg=None):
    return common.lm_7b("stage2", 5e12, arg, batch_size=2048)


def sweep(arg=None):
    return [
        {"optimizer.learning_rates.patch_decoder": lr, "optimizer.warmup_ratio": w}
        for lr in (1e-4, 2e-4, 4e-4)
        for w in (0.01, 0.03)
    ]
