"""Hugging Face interchange: import a local directory (config.json + safetensors) or a transformers model of
a supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3) as a moetrain model whose
logits equal transformers', and export a moetrain model back to a directory ``from_pretrained`` loads.

One module per family (its on-disk :class:`~moetrain.interop.hf.common.Layout` and config mappings both ways);
``common`` holds what they share, ``api`` the entry points. docs/hf.md has the workflow.
"""

from moetrain.interop.hf.api import (
    FAMILIES,
    apply_hf_architecture,
    hf_configs,
    hf_path,
    load_hf,
    load_hf_weights,
    load_mixtral,
    mixtral_configs,
    save_hf,
    save_mixtral,
)

__all__ = [
    "FAMILIES",
    "apply_hf_architecture",
    "hf_configs",
    "hf_path",
    "load_hf",
    "load_hf_weights",
    "load_mixtral",
    "mixtral_configs",
    "save_hf",
    "save_mixtral",
]
