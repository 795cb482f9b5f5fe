"""The parts every experiment config shares: the schema with its defaults, `parse_arg`, and the
report's model sizes and recipes. An experiment file starts from `base_config()` and sets what
differs; the train entry point reads only keys defined here (an unknown override is an error)."""

import ml_collections

from data_pipelines.config import DataConfig
from mimo_jax.lm.config import mimo_7b_hf

# Loss weights, text then one per codebook (the report's Table 3).
STAGE1_WEIGHTS = "1-0-0-0-0-0-0-0-0"
STAGE2_WEIGHTS = "100-12-8-6-4-2-2-1-1"
# Peak learning rates per module group (Table 3): pretraining (stages 1 and 2), fine-tuning.
PRETRAIN_LEARNING_RATES = {"patch_encoder": 2e-4, "llm": 3e-5, "patch_decoder": 2e-4}
SFT_LEARNING_RATES = {"patch_encoder": 5e-5, "llm": 1e-5, "patch_decoder": 5e-5}


# The demo's audio tokenizer: the released layout at toy width (random weights in the LM demo).
DEMO_TOKENIZER_HF = {
    "architectures": ["MiMoAudioTokenizer"],
    "model_type": "mimo_audio_tokenizer",
    "activation_function": "gelu",
    "avg_pooler": 2,
    "codebook_size": [1024, 1024] + [128] * 18,
    "d_model": 64,
    "decoder_attention_heads": 4,
    "decoder_attn_window_size": [-1, -1],
    "decoder_causal": True,
    "decoder_ffn_dim": 128,
    "decoder_kernel_size": 3,
    "decoder_layers": 2,
    "decoder_stride_size": 2,
    "encoder_attention_heads": 4,
    "encoder_attn_window_size": [-1, -1],
    "encoder_causal": False,
    "encoder_ffn_dim": 128,
    "encoder_layers": 2,
    "encoder_skip_layer_id": 1,
    "fmax": None,
    "fmin": 0,
    "hop_length": 240,
    "kernel_size": 3,
    "ln_type": "LayerNorm",
    "max_audio_seconds": 1800,
    "n_mels": 128,
    "nfft": 960,
    "num_quantizers": 20,
    "position_embedding_type": "rope",
    "rope_theta": 10000,
    "rope_type": "default",
    "sampling_rate": 24000,
    "scale_embedding": False,
    "stride_size": 2,
    "threshold_ema_dead_code": 2,
    "vocoder_attention_heads": 4,
    "vocoder_attn_window_size": [40, 10],
    "vocoder_dim": 32,
    "vocoder_intermediate_dim": 64,
    "vocoder_num_layers": 2,
    "vocoder_padding": "same",
    "window_size": 960,
}


def parse_arg(arg: str | None, **defaults):
    """`"a=1,b=x,flag"` -> ConfigDict(a=1, b='x', flag=True) with types from the defaults; a bare
    name sets a boolean to True (big_vision style)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r}: expected one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = _boolean(key, value) if eq else True
        elif not eq:
            raise ValueError(f"config argument {key!r}: expected {key}=VALUE ({kind.__name__})")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(
                    f"config argument {key}={value!r}: expected a {kind.__name__}"
                ) from None
    return out


def _boolean(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"config argument {key}={value!r}: expected true or false")


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh of a run (`sharding.mesh`): axis sizes within a slice (`ici`) and across
    slices (`dcn`; -1: all the rest), and the rule preset that places parameters on it."""
    c = ml_collections.ConfigDict()
    c.ici = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    c.dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    c.rules = "fsdp"
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10  # 0: only the last step is logged
    c.checkpoint_every = 500  # 0: only the last step (and a preemption) is saved
    c.eval_every = 0  # 0: no periodic evaluation (the only key where 0 means off)
    c.eval_steps = 4
    c.eval_at_start = False  # also evaluate before the first step of a fresh run (a baseline)
    c.export_model = True  # write the final weights to workdir/model (a model checkpoint)
    c.peak_tflops_per_device = 0.0  # for MFU; e.g. 989 (H100 bf16 dense), 197 (v5e), 459 (v5p)

    c.model = ml_collections.ConfigDict()
    c.model.hf = mimo_7b_hf()  # architecture when training from scratch
    c.model.init_checkpoint = ""  # a converted checkpoint (convert_torch_weights.py) to start from
    c.model.dtype = "bfloat16"  # compute
    c.model.param_dtype = "float32"  # parameters and optimizer state
    # "full": a 7B stage-2 row of 8192 groups fits 16 GiB per device (experiments.aot).
    c.model.remat_policy = "full"
    # The attention kernel: auto (splash on TPU, cuDNN on GPU, else xla), xla, splash, cudnn.
    c.model.attention = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = ""  # tokenizer.json of the text tokenizer
    # "DIR:TASK[:WEIGHT],...": shard directories, the task their records become, mixing weights
    c.data.sources = ""
    c.data.eval_sources = ""  # held-out shards for the evaluation every `eval_every` steps
    c.data.batch_size = 256  # global rows per step
    c.data.context_length = DataConfig.context_length  # groups per row
    # The group layout (group size, channels, empty ids) is the model's (its config.json).
    # factor on the text weight where the target is <|empty|>
    c.data.empty_text_weight = DataConfig.empty_text_weight
    c.data.skip_bad_records = DataConfig.skip_bad_records
    c.data.workers = 0
    c.data.split_by_process = True  # each process reads its slice (False: all read, rows split)

    c.loss = ml_collections.ConfigDict()
    c.loss.weights = STAGE2_WEIGHTS  # text, then one per codebook (as many as model channels)
    c.loss.text_chunk = 1024
    c.loss.patch_fraction = 1.0  # share of positions the patch decoder runs on (speech first)
    c.loss.patch_chunk = 1024  # positions per chunk of the patch decoder

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rates = ml_collections.ConfigDict(PRETRAIN_LEARNING_RATES)
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.01
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0  # 0: no clipping
    c.optimizer.grad_accum = 1
    c.optimizer.frozen = ()

    # LoRA adapters (mimo_jax.lm.lora), off while `rank` is 0. `targets`: regular expressions,
    # each fully matching official module names (`model.layers.3.self_attn.q_proj`; default: the
    # backbone's attention and MLP); `modes`: per module group, "lora" (base frozen, its targeted
    # layers adapted), "full" (every parameter trained) or "frozen". Adapters train at their
    # group's learning rate. The run ends with workdir/adapter (a PEFT directory) beside
    # workdir/model (adapters merged). `quantize` ("int8", "int4"; "": off) holds the kernels
    # of the linear layers of the "lora" and "frozen" groups quantised (QLoRA,
    # `mimo_jax.nn.quantized`), one scale per `quantize_tile` inputs of each output.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = (r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",)
    c.lora.modes = ml_collections.ConfigDict(
        {"patch_encoder": "frozen", "llm": "lora", "patch_decoder": "frozen"}
    )
    c.lora.quantize = ""
    c.lora.quantize_tile = 64

    c.mesh = mesh_config()

    # Generation with the current weights every `eval_every` steps (off while no prompt is given):
    # TTS of `tts_texts`, ASR of the clips of `asr_manifest` (tokenize's manifest format, with
    # transcripts; WER/CER to metrics.jsonl) and continuation of `continuation_audio` files; audio,
    # log-mel images and transcripts to TensorBoard. `audio_tokenizer`: its checkpoint.
    c.eval_generation = ml_collections.ConfigDict()
    c.eval_generation.audio_tokenizer = ""
    c.eval_generation.tts_texts = ()
    c.eval_generation.asr_manifest = ""
    c.eval_generation.continuation_audio = ()
    c.eval_generation.max_new_groups = 100  # per prompt

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c


def stage(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The report's recipes (Table 3): stage 1 (understanding), stage 2, and fine-tuning."""
    if name == "stage1":
        c.loss.weights = STAGE1_WEIGHTS
        rates = PRETRAIN_LEARNING_RATES
        c.optimizer.schedule = "constant"
        c.optimizer.frozen = ("patch_decoder",)
    elif name == "stage2":
        c.loss.weights = STAGE2_WEIGHTS
        rates = PRETRAIN_LEARNING_RATES
        c.optimizer.schedule = "cosine"
    elif name == "sft":
        c.loss.weights = STAGE2_WEIGHTS
        rates = SFT_LEARNING_RATES
        c.optimizer.schedule = "cosine"
    else:
        raise ValueError(f"unknown stage {name!r}: expected stage1, stage2 or sft")
    c.optimizer.learning_rates = ml_collections.ConfigDict(rates)
    c.optimizer.warmup_ratio = 0.01
    return c


def lm_7b(
    stage_name: str, tokens: float, arg: str | None, batch_size: int, checkpoint_every: int = 1000
) -> ml_collections.ConfigDict:
    """A 7B run of one of the report's stages over `tokens` groups (arg: batch_size, context)."""
    a = parse_arg(arg, batch_size=batch_size, context=DataConfig.context_length)
    c = stage(base_config(), stage_name)
    c.data.batch_size, c.data.context_length = a.batch_size, a.context
    c.total_steps = int(tokens // (a.batch_size * a.context))
    c.checkpoint_every = checkpoint_every
    return c


def tokenizer_config(stage: str, demo: bool, data: str) -> ml_collections.ConfigDict:
    """Audio tokenizer training, stage "stage1" (reconstruction, A2T, commitment, EMA codebooks)
    or "stage2" (decoder and vocoder against the discriminators), at the released size or, with
    `demo`, the demo's tokenizer on its eSpeak NG corpus (`data`: the demo's data directory)."""
    from mimo_jax.tokenizer.config import TokenizerConfig, to_hf

    c = ml_collections.ConfigDict()
    c.task = f"tokenizer_{stage}"
    c.seed = 0
    c.total_steps = (150 if stage == "stage1" else 40) if demo else 500_000
    # Stage 2's demo logs every step: its first record is the discriminators' loss at init.
    c.log_every = (5 if stage == "stage1" else 1) if demo else 50
    c.checkpoint_every = 30 if demo else 5000
    c.eval_every = 30 if demo else 5000  # reconstructions and spectrograms to TensorBoard
    c.export_model = True  # the tokenizer to workdir/model (buffers included)

    c.model = ml_collections.ConfigDict()
    c.model.tokenizer = dict(DEMO_TOKENIZER_HF) if demo else to_hf(TokenizerConfig())
    # Stage 1: "" trains from scratch; stage 2 needs the tokenizer stage 1 exported.
    c.model.init_checkpoint = ""
    c.model.remat_policy = "none" if demo else "full"  # the transformer stacks' (nn.remat)
    c.model.attention = "auto"  # their kernel: auto, xla, splash, cudnn (nn.attention)

    c.data = ml_collections.ConfigDict()
    c.data.manifests = f"{data}/manifest.jsonl"  # comma-separated; tokenize's format, with text
    c.data.tokenizer = f"{data}/tokenizer.json"  # the transcripts' tokenizer (the A2T LM's)
    c.data.crop_seconds = 1.0 if demo else 6.0
    c.data.batch_size = 8 if demo else 256  # crops per step, over all processes
    c.data.max_text_tokens = 64 if demo else 256
    c.data.short_clips = "pad"  # or "skip"
    c.data.workers = 0
    c.data.skip_bad_records = False

    # The audio-to-text LM (stage 1), a small Qwen2 stack trained jointly from scratch.
    c.a2t = ml_collections.ConfigDict(
        {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128}
        if demo
        else {"hidden": 1024, "layers": 12, "heads": 16, "kv_heads": 8, "ffn": 2816}
    )
    c.loss = ml_collections.ConfigDict(
        {"a2t": 10.0, "recon": 1.0, "commit": 1.0}
        if stage == "stage1"
        else {"recon": 1.0, "adversarial": 1.0, "feature_matching": 2.0}
    )
    c.ema = ml_collections.ConfigDict({"decay": 0.99, "epsilon": 1e-5, "kmeans_iters": 50})

    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 2e-4 if stage == "stage1" else 1e-4, "warmup_steps": 5 if demo else 2000}
    )
    c.optimizer.b1, c.optimizer.b2 = (0.9, 0.95) if stage == "stage1" else (0.8, 0.99)
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 1.0
    # Stage 2's discriminators (periods 2, 3, 5, 7, 11 and EnCodec's three STFT scales; widths
    # here) and their own Adam, without weight decay.
    c.discriminator = ml_collections.ConfigDict(
        {
            "mpd_channels": (8, 16, 32, 32, 32) if demo else (32, 128, 512, 1024, 1024),
            "stft_filters": 8 if demo else 32,
            "learning_rate": 1e-4,
            "b1": 0.8,
            "b2": 0.99,
        }
    )

    c.mesh = mesh_config()  # the LM's: the state placed by the same rules
    c.checkpoint = ml_collections.ConfigDict({"keep": 3, "async_save": not demo})
    return c
