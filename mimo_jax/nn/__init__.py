"""The transformer kit shared by the LM and the audio tokenizer: parameters with logical axes,
dense layers, norms, RoPE, attention (`attention.attend`), stacks of layers (`stack`: config,
building, scanning; `remat`: policies), dtypes by name, and the Qwen2 stack."""
