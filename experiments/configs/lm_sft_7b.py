"""MiMo-Audio-7B post-training (instruction fine-tuning): cosine LR 5e-5 (patch encoder and decoder)
/ 1e-5 (LLM), batch 2.1M groups (256 rows of 8192), 100B tokens, loss weights 100-12-8-6-4-2-2-1-1."""
from experiments.configs import common

TOKENS = 100e9


def get_config(arg=None):
    a = common.parse_arg(arg, batch_size=256, context=8192)
    c = common.stage(common.base_config(), "sft")
    c.data.batch_size, c.data.context_length = a.batch_size, a.context
    c.total_steps = int(TOKENS // (a.batch_size * a.context))
    c.checkpoint_every = 500
    return c


def sweep(arg=None):
    return [{"optimizer.learning_rates.llm": lr} for lr in (5e-6, 1e-5, 2e-5)]
