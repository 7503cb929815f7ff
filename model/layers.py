"""Small NNX modules that hold parameters and call jaxlm.ops.

Every parameter carries logical axis names as NNX sharding metadata
(`out_sharding`), so a mesh is mapped onto them by one rules table later
without touching the maths here.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops

from .config import Config


def dtype_of(name: str):
    return jnp.dtype(name)


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
               init: str, cfg: Config, std: float | None = None) -> nnx.Param:
    """A parameter of `shape` tagged with logical `axes` (one name per dimension)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    dtype = dtype_of(cfg.param_dtype)
    if init == "normal":
        std = cfg.init_std if std is None else std
        value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), sharding_names=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """y = x·W (+ b), contracting x's trailing `in_shape` dims into `out_shape`.

    W has shape in_shape + out_shape, e.g. [d, h, head_dim] for a query projection,
    so per-head weights need no reshapes and every einsum names its dims.
    """

    def __init__(self, cfg: Config, in_shape, out_shape, in_axes, out_axes, *,
                 bias: bool, rngs: nnx.Rngs, std: float | None = None):
        self.in_rank = len(in_shape)
        self.dtype = dtype_of(cfg.dtype)
        self.kernel = make_param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes),
                                 "normal", cfg, std)
        self.bias = (make_param(rngs, out_shape, out_axes, "zeros", cfg)
                     if bias else None)
        self.lora = nnx.data(None)  # a jaxlm.model.peft.LoRA beside this weight, when attached

    def __call__(self, x, peft=None):
        """peft: jaxlm.model.peft.PeftInputs for an attached LoRA (dropout key, row ids)."""
        n = self.in_rank
        x = x.astype(self.dtype)
        if hasattr(self.kernel, "matmul"):  # a jaxlm.model.quant.QuantizedParam
            y = self.kernel.matmul(x)
        else:
            w = self.kernel[...].astype(self.dtype)
            y = jnp.tensordot(x, w, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        if self.lora is not None:
            y = y + self.lora(x, peft)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def weight(self, dtype):
        """The kernel in `dtype`, with an attached LoRA's s·A·B added (for callers that
        use the weight itself rather than x·W, as MLA does with kv_b)."""
        w = self.kernel[...].astype(jnp.float32 if self.lora is not None else dtype)
        if self.lora is not None:
            w = w + self.lora.weight_delta(lead=self.lora.a[...].ndim - 1 - self.in_rank)
        return w.astype(dtype)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm (with bias) over the last axis of size `dim`."""

    def __init__(self, cfg: Config, dim: int, axis: str | None, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = make_param(rngs, (dim,), (axis,), "ones", cfg)
        self.bias = make_param(rngs, (dim,), (axis,), "zeros", cfg) if cfg.norm == "layer" else None

    def __call__(self, x):
        if self.kind == "rms":
            return ops.rms_norm(x, self.scale[...], eps=self.eps)
        return ops.layer_norm(x, self.scale[...], self.bias[...], eps=self.eps)


class RMSNorm(Norm):
    """An RMSNorm whatever cfg.norm says (QK-norm is RMS in every family that has it)."""

    def __init__(self, cfg: Config, dim: int, axis: str | None, rngs: nnx.Rngs):
        super().__init__(cfg.replace(norm="rms"), dim, axis, rngs)


class Embed(nnx.Module):
    """Token embedding [v, d]; `attend` is the tied LM head."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.dtype = dtype_of(cfg.dtype)
        self.embedding = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                    "normal", cfg)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype))


class MLP(nnx.Module):
    """Gated (act(x·Wg) ⊙ x·Wu)·Wd or plain act(x·Wu)·Wd feed-forward block."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, ffn_dim: int | None = None):
        d, f = cfg.d_model, ffn_dim or cfg.ffn_dim
        self.activation = cfg.activation
        def dense(i, o, ia, oa, std=None):
            return Dense(cfg, (i,), (o,), (ia,), (oa,), bias=cfg.mlp_bias, rngs=rngs, std=std)

        self.gate = dense(d, f, "embed", "mlp") if cfg.gated_mlp else None
        self.up = dense(d, f, "embed", "mlp")
        self.down = dense(f, d, "mlp", "embed", std=residual_std(cfg))

    def __call__(self, x, peft=None):
        if self.gate is not None:
            h = ops.glu(self.gate(x, peft), self.up(x, peft), self.activation)
        else:
            h = ops.get_activation(self.activation)(self.up(x, peft))
        return self.down(h, peft)


def residual_std(cfg: Config) -> float:
    """Output projections start smaller so the residual stream does not grow with depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)
