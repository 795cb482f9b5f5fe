"""MiMo-Audio-7B post-training (instruction fine-tuning): cosine LR 5e-5 (patch encoder and decoder)
/ 1e-5 (LLM), batch 2.1M groups (256 rows of 8192), 100B tokens, loss weights
100-12-8-6-4-2-2-1-1."""

from experiments.configs import common


def get_config(arg=None):
    return common.lm_7b("sft", 100e9, arg, batch_size=256, checkpoint_every=500)


def sweep(arg=None):
    return [{"optimizer.learning_rates.llm": lr} for lr in (5e-6, 1e-5, 2e-5)]
