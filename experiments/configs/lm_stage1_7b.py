"""MiMo-Audio-7B stage 1 (understanding): patch encoder + LLM on text targets only (loss weights
1-0-...-0, no patch decoder in the graph), constant LR 2e-4 / 3e-5, batch 16.8M groups (2048 rows of
8192), 2.6T tokens, warmup ratio 0.01 (the report's Table 3). Initialise from a converted checkpoint
with --config.model.init_checkpoint=DIR (the report starts from MiMo-7B-Base)."""

from experiments.configs import common


def get_config(arg=None):
    return common.lm_7b("stage1", 2.6e12, arg, batch_size=2048)


def sweep(arg=None):
    """Learning-rate x warmup sweep around the report's values."""
    return [
        {"optimizer.learning_rates.llm": lr, "optimizer.warmup_ratio": w}
        for lr in (1e-5, 3e-5, 1e-4)
        for w in (0.01, 0.03)
    ]
