"""RoPE settings between HF config.json (transformers 5's `rope_parameters`, and the older
top-level `rope_theta` + `rope_scaling`) and Config.rope_theta / rope_scaling."""
from __future__ import annotations

from typing import Any, Mapping

from jaxlm.ops.rope import RopeScaling

from ..config import Config


def rope_from_hf(hf: Mapping[str, Any], max_position: int):
    """(rope_theta, RopeScaling | None, rotary_fraction), read the way transformers 5 reads
    both `rope_parameters` and the older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported (one RoPE for "
                         "all layers only)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fraction = float(params.get("partial_rotary_factor",
                                hf.get("partial_rotary_factor") or 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style)
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings") or max_position
    factor = params.get("factor")
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = RopeScaling("linear", factor=float(factor))
    elif kind == "dynamic":  # HF grows the base past max_position_embeddings, not "original"
        scaling = RopeScaling("dynamic", factor=float(factor), original_max_position=max_position)
    elif kind == "llama3":
        scaling = RopeScaling("llama3", factor=float(factor), original_max_position=int(original),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
        opt = {k: params.get(k) for k in ("mscale", "mscale_all_dim", "attention_factor")}
        scaling = RopeScaling("yarn", factor=float(factor or max_position / original),
                              original_max_position=int(original),
                              beta_fast=float(params.get("beta_fast") or 32.0),
                              beta_slow=float(params.get("beta_slow") or 1.0),
                              truncate=bool(params.get("truncate", True)), **opt)
    else:
        raise ValueError(f"rope_type={kind!r} is not supported; jaxlm maps default, linear, "
                         f"dynamic, llama3 and yarn")
    return theta, scaling, fraction


def rope_to_hf(cfg: Config) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for cfg."""
    sc = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": sc.kind if sc else "default",
                           "rope_theta": float(cfg.rope_theta)}
    if sc is None or sc.kind == "default":
        return {**out, "rope_type": "default"}
    out["factor"] = float(sc.factor)
    if sc.kind == "llama3":
        out.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                   original_max_position_embeddings=sc.original_max_position)
    elif sc.kind == "yarn":
        out.update(original_max_position_embeddings=sc.original_max_position,
                   beta_fast=sc.beta_fast, beta_slow=sc.beta_slow, truncate=sc.truncate)
        out.update({k: getattr(sc, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                    if getattr(sc, k) is not None})
    return out
