"""Flax NNX modules that hold parameters and call jaxlm.ops."""
from .build import SplitModel, abstract_model, create
from .cache import KVCache
from .config import PRESETS, Config, LayerKind, preset
from .transformer import Block, CausalLM, Output
from .quant import quantize
from .io import config_from_hf, from_hf, hf_config_from, load_peft, save_peft, to_hf
