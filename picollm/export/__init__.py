"""Export a run for use elsewhere: hf.py (a transformers model directory), gguf.py (llama.cpp's format)."""

from .hf import export_hf, hf_architecture, llama_config, llama_state_dict

__all__ = ["export_hf", "hf_architecture", "llama_config", "llama_state_dict"]
