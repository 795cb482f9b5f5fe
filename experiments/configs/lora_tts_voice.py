"""Fine-tune TTS to one voice with LoRA: the backbone's attention and MLP adapted (rank 16), the
patch decoder (which writes the voice's codes) trained in full, the patch encoder frozen. The
held-out recordings of the voice are evaluated before the first step and every `eval_every` steps:
`eval/loss` in metrics.jsonl shows what the fine-tuning gained.

    python -m data_pipelines.voice --voice-dir VOICE --checkpoint runs/demo/audio_tokenizer \
        --out runs/voice/data
    python -m experiments.train --workdir runs/voice/lora \
        --config experiments/configs/lora_tts_voice.py:data=runs/voice/data

`python -m experiments.demo_voice` runs both on an eSpeak NG voice that the demo never used.
Arguments: `data` (data_pipelines.voice's --out: train/ and heldout/ shards), `base` (the model
checkpoint to fine-tune; default the demo's stage 2 model), `tokenizer` (its text tokenizer),
`smoke` (a few steps, for tests). The sizes and the mesh are the demo's.
"""

import ml_collections

from experiments.configs import common, demo


def get_config(arg=None):
    a = common.parse_arg(
        arg,
        data="runs/voice/data",
        base="runs/demo/stage2/model",
        tokenizer="runs/demo/data/tokenizer.json",
        smoke=False,
    )
    c = demo.get_config(f"stage=stage2,smoke={a.smoke}")
    c.model.init_checkpoint = a.base  # the architecture comes from it too
    c.data.tokenizer = a.tokenizer
    c.data.sources = f"{a.data}/train:tts:1"
    c.data.eval_sources = f"{a.data}/heldout:tts:1"
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.lora.modes = ml_collections.ConfigDict(
        {"patch_encoder": "frozen", "llm": "lora", "patch_decoder": "full"}
    )
    # The backbone's adapters at a low rate: at 2e-3 they learned the few training transcripts by
    # heart, and the held-out text loss rose (0.197 -> 0.316 on the demo) while the codes improved.
    c.optimizer.learning_rates = ml_collections.ConfigDict(
        {"patch_encoder": 1e-3, "llm": 3e-4, "patch_decoder": 1e-3}
    )
    c.total_steps = 6 if a.smoke else 60
    c.log_every = 2 if a.smoke else 10
    c.checkpoint_every = c.total_steps
    c.eval_every = 6 if a.smoke else 30
    c.eval_at_start = True
    c.eval_steps = 2
    return c


def sweep(arg=None):
    return [{"lora.rank": r} for r in (8, 16, 32)]
