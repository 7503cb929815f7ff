"""Pure JAX functions (no parameters, no Flax) for decoder language models."""
from .activations import (ACTIVATIONS, geglu, gelu, gelu_tanh, get_activation, glu,
                          relu, silu, swiglu)
from .attention import (alibi_bias, attention, attention_mask, default_positions,
                        soft_cap, xla_attention)
from .norms import layer_norm, rms_norm
from .positional import alibi_slopes, sinusoidal_positions
from .rope import RopeScaling, apply_rope, rope_cos_sin, rope_frequencies, yarn_mscale
