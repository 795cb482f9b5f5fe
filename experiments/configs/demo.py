"""A tiny MiMo-Audio LM on the eSpeak NG demo corpus, trained on the CPU.

    python -m experiments.demo                  # builds the corpus, tokenizes, stage 1 then stage 2
    python -m experiments.train --config experiments/configs/demo.py:stage=stage2 --workdir DIR

Arguments: `stage` (stage1, stage2), `data` (the directory experiments.demo prepares: shards/ and
tokenizer.json), `smoke` (the smallest size, about a second a step, for tests), `channels` (the
audio channels the LM models: the first N of the tokenizer's 8 codebooks, with their delays; the
tests train 2, a quicker compile).
The special token ids are those of the demo BPE tokenizer (its special tokens come first, in the
order of mimo_jax.tasks.text_tokenizer.SPECIAL_TOKENS); training checks them against the tokenizer.
"""

from experiments.configs import common
from mimo_jax.lm.config import mimo_7b_hf

DEMO_IDS = dict(sosp_idx=3, eosp_idx=4, empty_idx=5, sostm_idx=8, eostm_idx=9, eot_idx=10)


def _first(dashed: str, n: int) -> str:
    return "-".join(dashed.split("-")[:n])


def demo_hf(smoke: bool, channels: int = 8) -> dict:
    hf = mimo_7b_hf()
    width = 32 if smoke else 128
    hf.update(
        vocab_size=1024,
        hidden_size=width,
        num_hidden_layers=2 if smoke else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        intermediate_size=3 * width,
        local_dim=width // 2,
        local_layers=2,
        local_attn_heads=4,
        local_ffn_dim=3 * width // 2,
        input_local_layers=1 if smoke else 2,
        input_local_dim=width // 2,
        **DEMO_IDS,
    )
    hf["audio_channels"] = channels
    for key in ("speech_vocab_size", "speech_zeroemb_idx", "delay_pattern"):
        hf[key] = _first(hf[key], channels)
    return hf


def get_config(arg=None):
    a = common.parse_arg(arg, stage="stage2", data="runs/demo/data", smoke=False, channels=8)
    if not 1 <= a.channels <= 8:
        raise ValueError(f"config argument channels={a.channels}: expected 1 to 8")
    c = common.stage(common.base_config(), a.stage)
    c.model.hf = demo_hf(a.smoke, a.channels)
    c.loss.weights = _first(c.loss.weights, 1 + a.channels)  # text, then one per channel
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.data.tokenizer = f"{a.data}/tokenizer.json"
    tasks = ("continuation", "asr") if a.stage == "stage1" else ("interleave", "tts", "asr")
    c.data.sources = ",".join(f"{a.data}/shards:{t}:1" for t in tasks)
    c.data.eval_sources = f"{a.data}/shards:{tasks[0]}:1"
    c.data.batch_size = 2 if a.smoke else 4
    c.data.context_length = 128 if a.smoke else 256
    c.data.empty_text_weight = 0.1
    c.data.skip_bad_records = True
    c.mesh.ici = {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1}
    c.mesh.dcn = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    c.mesh.rules = "data"
    c.optimizer.learning_rates = {"patch_encoder": 3e-3, "llm": 3e-3, "patch_decoder": 3e-3}
    c.optimizer.warmup_ratio = 0.05
    c.optimizer.weight_decay = 0.01
    c.total_steps = 20 if a.smoke else 150
    c.log_every = 5 if a.smoke else 15
    c.checkpoint_every = 10 if a.smoke else 75
    c.eval_every = 0 if a.smoke else 75
    c.eval_steps = 2
    c.checkpoint.async_save = not a.smoke
    return c


def sweep(arg=None):
    return [{"optimizer.learning_rates.llm": lr} for lr in (1e-3, 3e-3)]
