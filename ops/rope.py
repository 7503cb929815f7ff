"""Rotary position embeddings (RoPE) and the context-extension scalings.

Two memory layouts of the rotated pairs:
  * "half"        (Llama / NeoX / Qwen): pair i is (x[i], x[i + r/2])
  * "interleaved" (GPT-J / the RoFormer paper): pair i is (x[2i], x[2i+1])
Partial rotary: only the first `rotary_dim` features rotate, the rest pass through.

Scalings follow the published recipes (and Hugging Face's `rope_type` names):
"default", "linear", "dynamic" (NTK-aware, grows with the sequence), "llama3",
"yarn" (with its attention factor, DeepSeek's mscale/mscale_all_dim included).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

SCALING_KINDS = ("default", "linear", "dynamic", "llama3", "yarn")
LAYOUTS = ("half", "interleaved")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Settings of one RoPE scaling recipe; unused fields are ignored by the others."""
    kind: str = "default"
    factor: float = 1.0
    # Context length the model was pretrained at (llama3, yarn, dynamic).
    original_max_position: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in SCALING_KINDS:
            raise ValueError(f"RopeScaling.kind={self.kind!r}; choose one of {SCALING_KINDS}")
        if self.kind != "default" and self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn", "dynamic") and self.original_max_position is None:
            raise ValueError(f"RopeScaling(kind={self.kind!r}) needs original_max_position "
                             f"(the pretraining context length)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _base_inv_freq(rotary_dim: int, theta):
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def _llama3(inv_freq, sc: RopeScaling):
    old_len = sc.original_max_position
    low_wavelen = old_len / sc.low_freq_factor
    high_wavelen = old_len / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _yarn(rotary_dim: int, theta: float, sc: RopeScaling):
    def correction_dim(rotations):
        return (rotary_dim * math.log(sc.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(sc.beta_fast), correction_dim(sc.beta_slow)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = _base_inv_freq(rotary_dim, theta)
    interpolation = extrapolation / sc.factor
    keep = 1 - ramp  # 1 where the frequency is high enough to extrapolate unchanged
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if sc.attention_factor is not None:
        attn = sc.attention_factor
    elif sc.mscale and sc.mscale_all_dim:
        attn = yarn_mscale(sc.factor, sc.mscale) / yarn_mscale(sc.factor, sc.mscale_all_dim)
    else:
        attn = yarn_mscale(sc.factor)
    return inv_freq, attn


def rope_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                     seq_len=None):
    """Inverse frequencies [rotary_dim/2] and the cos/sin attention factor.

    `seq_len` (may be traced) is only read by the "dynamic" scaling, whose base
    grows once the sequence exceeds the pretraining length.
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    sc = scaling or RopeScaling()
    if sc.kind == "default":
        return _base_inv_freq(rotary_dim, theta), 1.0
    if sc.kind == "linear":
        return _base_inv_freq(rotary_dim, theta) / sc.factor, 1.0
    if sc.kind == "llama3":
        return _llama3(_base_inv_freq(rotary_dim, theta), sc), 1.0
    if sc.kind == "yarn":
        return _yarn(rotary_dim, theta, sc)
    # dynamic NTK: base' = base·(factor·L/L0 − (factor − 1))^(r/(r−2)), L = max(seq, L0)
    l0 = sc.original_max_position
    length = jnp.maximum(jnp.asarray(l0 if seq_len is None else seq_len, jnp.float32), l0)
    base = theta * (sc.factor * length / l0 - (sc.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return _base_inv_freq(rotary_dim, base), 1.0


def rope_cos_sin(positions, inv_freq, attention_factor: float = 1.0):
    """cos, sin [b,t,r/2] (float32) for integer positions [b,t]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x, cos, sin, layout: str = "half"):
    """Rotate the first 2·cos.shape[-1] features of x [b,t,h,d]; the rest pass through."""
    if layout not in LAYOUTS:
        raise ValueError(f"rope layout={layout!r}; choose one of {LAYOUTS}")
    r = 2 * cos.shape[-1]
    if r > x.shape[-1]:
        raise ValueError(f"rotary_dim {r} exceeds head_dim {x.shape[-1]}")
    rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if layout == "half":
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)
