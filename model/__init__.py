"""Flax NNX modules that hold parameters and call jaxlm.ops."""
from .cache import KVCache
from .config import PRESETS, Config, preset
from .transformer import Block, CausalLM, Output
