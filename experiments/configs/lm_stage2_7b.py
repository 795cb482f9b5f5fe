"""MiMo-Audio-7B stage 2 (understanding + generation): all parameters, loss weights
100-12-8-6-4-2-2-1-1, delay pattern 0-1-...-7, text-guided 5:5 interleaving, cosine LR 2e-4 (patch
encoder and decoder) / 3e-5 (LLM), batch 16.8M groups (2048 rows of 8192), 5T tokens, warmup 0.01."""
from experiments.configs import common

TOKENS = 5e12


def get_config(arg=None):
    a = common.parse_arg(arg, batch_size=2048, context=8192)
    c = common.stage(common.base_config(), "stage2")
    c.data.batch_size, c.data.context_length = a.batch_size, a.context
    c.total_steps = int(TOKENS // (a.batch_size * a.context))
    c.checkpoint_every = 1000
    return c


def sweep(arg=None):
    return [{"optimizer.learning_rates.patch_decoder": lr, "optimizer.warmup_ratio": w}
            for lr in (1e-4, 2e-4, 4e-4) for w in (0.01, 0.03)]
