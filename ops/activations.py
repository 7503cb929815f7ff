"""Activation functions and the gated (GLU) forms used in decoder MLPs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def relu(x):
    return jnp.maximum(x, 0)


def gelu(x):
    """Exact GELU: x·Φ(x)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    """GELU's tanh approximation (GPT-2's "gelu_new", "gelu_pytorch_tanh")."""
    return jax.nn.gelu(x, approximate=True)


def silu(x):
    return x * jax.nn.sigmoid(x)


ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation={name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def swiglu(gate, up):
    """SwiGLU (Shazeer 2020): silu(gate) · up."""
    return silu(gate) * up


def geglu(gate, up, approximate: bool = True):
    """GeGLU: gelu(gate) · up (tanh-approximate GELU by default, as Gemma)."""
    return jax.nn.gelu(gate, approximate=approximate) * up


def glu(gate, up, activation: str):
    """The gated form of any named activation: act(gate) · up."""
    return get_activation(activation)(gate) * up
