"""Flax NNX modules that hold parameters and call jaxlm.ops."""
from .cache import KVCache
from .config import PRESETS, Config, preset
from .transformer import Block, CausalLM, Output
from .hf import config_from_hf, from_hf, hf_config_from, to_hf
