"""Export a run for use elsewhere: hf.py (a transformers model directory), gguf.py (llama.cpp's format)."""

from .gguf import DTYPES as GGUF_DTYPES
from .gguf import export_gguf, gguf_refusal
from .hf import export_hf, hf_architecture, llama_config, llama_state_dict

__all__ = ["GGUF_DTYPES", "export_gguf", "export_hf", "gguf_refusal", "hf_architecture", "llama_config",
           "llama_state_dict"]
