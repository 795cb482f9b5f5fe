"""The MiMo-Audio LM: config (the official config.json), patch encoder, Qwen2-style backbone,
patch decoder, the official token layout, the conversion rules of its parameter names, its module
groups, LoRA adapters and their PEFT export."""
