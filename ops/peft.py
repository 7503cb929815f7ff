"""The maths of parameter-efficient fine-tuning: LoRA deltas (one adapter, or a stack of
adapters chosen per batch row), merging them into a weight, and bottleneck adapters.

Shapes follow jaxlm's Dense: a weight W [*in, *out] contracts x's trailing len(in) dims.
LoRA factors are A [*in, r] and B [r, *out], so W + s·A·B has W's shape and
    y = x·W + s·(x·A)·B          (s = alpha/r, or alpha/sqrt(r) for rsLoRA)
never forms the [*in, *out] product during training or multi-adapter serving.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .activations import get_activation


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's `scaling`: alpha/r, or alpha/sqrt(r) with rank-stabilised LoRA."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def kaiming_uniform(key, shape, fan_in: int, dtype=jnp.float32):
    """torch's kaiming_uniform_(w, a=sqrt(5)), how PEFT (and nn.Linear) initialise LoRA's
    A: gain sqrt(2/(1+a²)) = sqrt(1/3), bound gain·sqrt(3/fan_in) = 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _contract(x, w, n: int):
    """x's trailing n dims · w's leading n dims."""
    return jnp.tensordot(x, w, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))


def lora_delta(x, a, b, scale):
    """s·(x·A)·B for one adapter. x [.., *in]; a [*in, r]; b [r, *out] → [.., *out]."""
    n_in = a.ndim - 1
    return _contract(_contract(x, a.astype(x.dtype), n_in), b.astype(x.dtype), 1) * scale


def lora_delta_rows(x, a, b, scales, ids):
    """Each batch row's own adapter: s[i]·(x·A[i])·B[i] with i = ids[row], nothing where
    ids[row] < 0. x [b, .., *in]; a [n, *in, r]; b [n, r, *out]; scales [n]; ids [b], or
    [b,t] (one adapter per token: lora_delta_tokens). Adapters of different ranks are
    stacked zero-padded to the largest (exact: the padded rank components contribute 0)."""
    n_in = a.ndim - 2
    if ids.ndim == 2:
        return lora_delta_tokens(x, a, b, scales, ids)
    none = ids < 0
    pick = jnp.where(none, 0, ids)
    a_rows = jnp.take(a, pick, axis=0).astype(x.dtype)           # [b, *in, r]
    b_rows = jnp.take(b, pick, axis=0).astype(x.dtype)           # [b, r, *out]
    s = jnp.where(none, 0.0, jnp.take(jnp.asarray(scales, jnp.float32), pick)).astype(x.dtype)
    lead = x.ndim - n_in - 1  # x's dims between the row and *in (e.g. time)
    xs = x.reshape(x.shape[0], -1, *x.shape[x.ndim - n_in:])     # [b, m, *in]
    in_dims = tuple(range(2, 2 + n_in))
    h = jax.lax.dot_general(xs, a_rows, ((in_dims, tuple(range(1, 1 + n_in))), ((0,), (0,))))
    out = jax.lax.dot_general(h, b_rows, (((2,), (1,)), ((0,), (0,))))  # [b, m, *out]
    out = out * s.reshape(-1, *([1] * (out.ndim - 1)))
    return out.reshape(*x.shape[:1 + lead], *b.shape[2:])


def _token_mask(ids, n: int, scales=None):
    """ids [b,t] → [b·t, n]: one-hot of each token's adapter (zero row where ids < 0),
    times its scale when scales [n] are given."""
    mask = jax.nn.one_hot(ids.reshape(-1), n, dtype=jnp.float32)   # -1 → all zeros
    return mask if scales is None else mask * jnp.asarray(scales, jnp.float32)


def lora_delta_tokens(x, a, b, scales, ids):
    """One adapter per token: x [b,t,*in], ids [b,t] (a continuous batch packs tokens of
    many requests into one row). Every token goes through every stacked A (r is small),
    then its own B alone, picked by a scaled one-hot: gathering each token's A and B
    instead would copy n·(in+out)·r weights per token."""
    n, n_in = a.shape[0], a.ndim - 2
    xs = x.reshape(-1, *x.shape[x.ndim - n_in:])                 # [m, *in]
    in_dims = tuple(range(1, 1 + n_in))
    h = jax.lax.dot_general(xs, a.astype(x.dtype),
                            ((in_dims, tuple(range(1, 1 + n_in))), ((), ())))  # [m, n, r]
    h = h * _token_mask(ids, n, scales).astype(x.dtype)[..., None]
    out = jnp.tensordot(h, b.astype(x.dtype), axes=((1, 2), (0, 1)))   # [m, *out]
    return out.reshape(*x.shape[:x.ndim - n_in], *b.shape[2:])


def lora_weight_delta(a, b, scale, lead: int = 0):
    """s·A·B as a weight. a [*L, *in, r], b [*L, r, *out] with `lead` shared leading dims L
    (e.g. experts) → [*L, *in, *out]."""
    a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])             # [*L, in, r]
    b2 = b.reshape(*b.shape[:lead + 1], -1)                      # [*L, r, out]
    w = jnp.matmul(a2, b2) * scale
    return w.reshape(*a.shape[:-1], *b.shape[lead + 1:])


def merge_lora(w, a, b, scale, lead: int = 0):
    """W + s·A·B in W's dtype (merge); merge_lora(w, a, b, -scale) undoes it."""
    delta = lora_weight_delta(a.astype(jnp.float32), b.astype(jnp.float32), scale, lead)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def bottleneck(x, down, up, activation: str, down_bias=None, up_bias=None):
    """Houlsby/Pfeiffer adapter with its residual: x + act(x·D + bd)·U + bu.
    x [.., d]; down [d, m]; up [m, d]."""
    h = x @ down.astype(x.dtype)
    if down_bias is not None:
        h = h + down_bias.astype(x.dtype)
    h = get_activation(activation)(h) @ up.astype(x.dtype)
    if up_bias is not None:
        h = h + up_bias.astype(x.dtype)
    return x + h


def bottleneck_rows(x, down, up, activation: str, down_bias, up_bias, ids):
    """Each row's own bottleneck adapter (stacked [n, ..] and zero-padded to the widest),
    the identity where ids[row] < 0. x [b, .., d]; ids [b], or [b,t]: one per token."""
    if ids.ndim == 2:   # per token: each token's row of the stack is its own "batch row"
        flat = bottleneck_rows(x.reshape(-1, 1, x.shape[-1]), down, up, activation,
                               down_bias, up_bias, ids.reshape(-1))
        return flat.reshape(x.shape)
    none = ids < 0
    pick = jnp.where(none, 0, ids)
    take = lambda p: jnp.take(p, pick, axis=0).astype(x.dtype)  # noqa: E731
    xs = x.reshape(x.shape[0], -1, x.shape[-1])
    h = jnp.einsum("bmd,bdk->bmk", xs, take(down)) + take(down_bias)[:, None]
    h = jnp.einsum("bmk,bkd->bmd", get_activation(activation)(h), take(up)) + take(up_bias)[:, None]
    h = jnp.where(none[:, None, None], 0, h)
    return x + h.reshape(x.shape)
