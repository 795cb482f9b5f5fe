"""LoRA fine-tuning of MiMo-Audio-7B with the defaults of the public PyTorch trainer
(OpenT2S/MiMo-Audio-Training, its arguments.py and train_multiGPU_torchrun.sh): rank 64, alpha 16,
dropout 0.05 on the backbone's q/k/v/o projections, everything else frozen, weights in bfloat16
(its model.to(torch.bfloat16)); AdamW (Hugging Face defaults: b2 0.999, clipping at 1.0) at 2e-5
for every group, cosine with 3 % warmup, weight decay 0.01; loss weights 100-12-8-6-4-2-2-1-1; rows
of 8192 groups, 32 a step (16 per device, 2 accumulated, on its one GPU).

    python -m experiments.train --config experiments/configs/lora_sft_7b.py --workdir runs/lora \
        --config.model.init_checkpoint=ckpt/mimo-7b --config.data.sources=DIR:tts:1
    python -m experiments.aot --config experiments/configs/lora_sft_7b.py --devices 1 --mesh fsdp=1
    python -m experiments.aot --config experiments/configs/lora_sft_7b.py --devices 1 \
        --mesh fsdp=1 --config.lora.quantize=int8

One 8192-group row on one device compiles (XLA:CPU's figures) to 22.3 GiB with the bf16 base,
15.7 GiB with the base in int8 (QLoRA) and 12.3 GiB in int4.

Arguments: `batch_size` (rows a step), `context` (groups a row).
"""

import ml_collections

from experiments.configs import common


def get_config(arg=None):
    c = common.lm_7b("sft", 32 * 8192 * 1000, arg, batch_size=32)
    c.model.param_dtype = "bfloat16"
    c.lora.rank, c.lora.alpha, c.lora.dropout = 64, 16.0, 0.05
    c.lora.targets = (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj",)
    c.lora.modes = ml_collections.ConfigDict(
        {"patch_encoder": "frozen", "llm": "lora", "patch_decoder": "frozen"}
    )
    c.optimizer.learning_rates = ml_collections.ConfigDict(
        {"patch_encoder": 2e-5, "llm": 2e-5, "patch_decoder": 2e-5}
    )
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.01
    c.optimizer.b2 = 0.999
    return c


def sweep(arg=None):
    return [{"lora.rank": r, "lora.alpha": a} for r, a in ((16, 16.0), (64, 16.0), (64, 128.0))]
