"""The module groups of the MiMo-Audio LM: the unit of per-group learning rates, freezing, LoRA
and fine-tuning in full.

  patch_encoder  input_local_transformer, speech_embeddings, speech_group_downcast
  llm            model (the Qwen2 backbone with its token embedding), lm_head
  patch_decoder  local_transformer, local_transformer_lm_heads, hidden_states_downcast,
                 speech_embeddings_to_local
"""

GROUP_OF_MODULE = {
    "input_local_transformer": "patch_encoder",
    "speech_embeddings": "patch_encoder",
    "speech_group_downcast": "patch_encoder",
    "model": "llm",
    "lm_head": "llm",
    "local_transformer": "patch_decoder",
    "local_transformer_lm_heads": "patch_decoder",
    "hidden_states_downcast": "patch_decoder",
    "speech_embeddings_to_local": "patch_decoder",
}
GROUPS = ("patch_encoder", "llm", "patch_decoder")


def group_of(path: tuple[str, ...]) -> str:
    if path[0] not in GROUP_OF_MODULE:
        raise KeyError(f"parameter {'.'.join(path)} belongs to no module group")
    return GROUP_OF_MODULE[path[0]]
