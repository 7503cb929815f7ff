"""How models travel: Hugging Face checkpoint directories in and out.

  hf_config     config.json ⇄ Config (hf_layers: per-layer patterns, hf_rope: RoPE)
  hf_rules      where each HF tensor goes in a CausalLM, for every family
  tensor_files  safetensors reading (headers first, data per tensor) and writing
  hf            from_hf / to_hf, which put those together
  runs          jaxlm's own training run directories (run.json + orbax checkpoints)
  peft          adapters in Hugging Face PEFT's format (save_peft / load_peft)
  tokenizer     byte-level and Hugging Face `tokenizers` tokenizers
  chat          chat templates (jinja2, rendered as transformers does) and their tokens
"""
from .hf import from_hf, to_hf
from .hf_config import config_from_hf, hf_config_from
from .peft import load_peft, save_peft

__all__ = ["config_from_hf", "from_hf", "hf_config_from", "load_peft", "save_peft", "to_hf"]
