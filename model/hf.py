"""Hugging Face checkpoint directories in and out: config.json + safetensors ⇄ CausalLM.

    lm = from_hf("/models/Llama-3.2-1B")     # a local directory; the Hub is never contacted
    to_hf(lm, "/tmp/out")                    # AutoModelForCausalLM.from_pretrained("/tmp/out")

Families: Llama 1/2/3 (llama3 RoPE, attention/MLP bias), Mistral (sliding window),
Qwen2 (qkv bias), Qwen3 (QK-norm, explicit head_dim), GPT-2 (learned positions,
LayerNorm, fused c_attn, Conv1D weights). Each family is a list of `_Rule`s, one per HF
tensor name, that say which jaxlm Params it fills and how the layout changes; reading
and writing walk the same list, so import and export cannot drift apart.

Loading is strict and all-or-nothing: every missing, unexpected and wrongly shaped
tensor is collected from the safetensors headers and reported in one ValueError before
any tensor data is read, and the model is only assembled once every tensor converted.
safetensors files are parsed directly (8-byte header length, JSON header, raw data), so
no pickle runs and bfloat16 needs no torch.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.ops.rope import RopeScaling

from .config import DTYPES, Config
from .hf_moe import FAMILIES as MOE_FAMILIES, expert_rules, family_of, hf_fields, mla_rules
from .hf_moe import moe_fields, moe_wrong
from .build import abstract_model
from .sharding import logical_to_spec
from .transformer import CausalLM

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", **MOE_FAMILIES}
_PREFIX = {**{f: "model." for f in ARCHITECTURES}, "gpt2": "transformer."}
# HF defaults for keys a config.json may leave out (transformers' config classes).
_MAX_POSITION = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768,
                 "mixtral": 131072, "qwen2_moe": 32768, "qwen3_moe": 32768,
                 "deepseek_v3": 4096}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh"}
# Non-parameter buffers some exporters keep in the state dict.
_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|h\.\d+\.attn\.(bias|masked_bias))$")


def _family(hf: Mapping[str, Any]) -> str:
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type in ARCHITECTURES:
        return model_type
    by_arch = {a: t for t, a in ARCHITECTURES.items()}
    for arch in archs:
        if model_type is None and arch in by_arch:
            return by_arch[arch]
    raise ValueError(f"unsupported Hugging Face model: model_type={model_type!r}, "
                     f"architectures={archs}; jaxlm reads "
                     + ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items()))


# Config: HF dict → jaxlm ----------------------------------------------------------
def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"HF activation {name!r} is not supported; known: "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope_from_hf(hf: Mapping[str, Any], max_position: int):
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


def _no_sliding_layers(hf: Mapping[str, Any], family: str) -> None:
    """Qwen slides only layers >= max_window_layers, and only with use_sliding_window."""
    if not hf.get("use_sliding_window", False):
        return
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                      else "full_attention" for i in range(n)]
    if hf.get("sliding_window") is not None and "sliding_attention" in types:
        raise ValueError(f"{family}: use_sliding_window=true (sliding attention on some "
                         f"layers) is not supported; jaxlm has one attention kind for all "
                         f"layers. Use a checkpoint with use_sliding_window=false.")


def _dtype_from_hf(hf: Mapping[str, Any]) -> str | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    return name if name in DTYPES else None


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The jaxlm Config of a Hugging Face config.json (a dict, or a transformers config)."""
    hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    family = _family(hf)
    dtype = _dtype_from_hf(hf) or "float32"
    if family == "gpt2":
        return _gpt2_config(hf, dtype)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    absent = [k for k in required if hf.get(k) is None]
    if absent:
        raise ValueError(f"{family} config.json lacks {absent}")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    max_position = hf.get("max_position_embeddings") or _MAX_POSITION[family]
    theta, scaling, fraction = _rope_from_hf(hf, max_position)
    head_dim = hf.get("head_dim") or (128 if family == "qwen3" else None)
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        head_dim=None if head_dim in (None, d // h) and d % h == 0 else head_dim,
        ffn_dim=hf["intermediate_size"], activation=_activation(hf.get("hidden_act", "silu")),
        gated_mlp=True, norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope", max_position=max_position, rope_theta=theta, rope_scaling=scaling,
        rotary_fraction=fraction, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)
    if family == "llama":
        bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    elif family == "mistral":
        fields.update(sliding_window=hf.get("sliding_window", 4096))
    elif family == "qwen2":
        _no_sliding_layers(hf, family)
        fields.update(qkv_bias=True)
    elif family == "qwen3":
        _no_sliding_layers(hf, family)
        bias = bool(hf.get("attention_bias", False))
        fields.update(qk_norm=True, qkv_bias=bias, out_bias=bias)
    elif family in MOE_FAMILIES:
        fields.update(moe_fields(hf, family))
    return Config(**fields)


def _gpt2_config(hf: Mapping[str, Any], dtype: str) -> Config:
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"gpt2: {flag}=true is not supported by jaxlm")
    d = hf.get("n_embd", hf.get("hidden_size", 768))
    return Config(
        vocab_size=hf.get("vocab_size", 50257), d_model=d,
        n_layers=hf.get("n_layer", hf.get("num_hidden_layers", 12)),
        n_heads=hf.get("n_head", hf.get("num_attention_heads", 12)),
        ffn_dim=hf.get("n_inner") or 4 * d,
        activation=_activation(hf.get("activation_function", "gelu_new")), gated_mlp=False,
        norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
        max_position=hf.get("n_positions", hf.get("max_position_embeddings", 1024)),
        qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)


# Config: jaxlm → HF dict ----------------------------------------------------------
def _pick_family(cfg: Config) -> tuple[str, list[str]]:
    """The HF family that can hold cfg, and what it cannot represent (empty when exact)."""
    moe_family = family_of(cfg)
    plain = (("post_norm", False), ("attn_softcap", None), ("final_softcap", None))
    if moe_family is None:
        plain += (("attention", "gqa"), ("n_experts", 0))
    wrong = [f"{f}={getattr(cfg, f)!r}" for f, ok in plain if getattr(cfg, f) != ok]
    scale_ok = cfg.attn_scale is None or math.isclose(cfg.attn_scale, cfg.dim_per_head ** -0.5)
    if cfg.position == "learned":
        bias = cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias
        wrong += [why for why, bad in (
            ("norm must be 'layer'", cfg.norm != "layer"),
            ("gated_mlp must be False", cfg.gated_mlp),
            ("qkv_bias, out_bias and mlp_bias must all be True", not bias),
            ("n_kv_heads must equal n_heads", cfg.num_kv_heads != cfg.n_heads),
            ("head_dim must be d_model // n_heads", cfg.dim_per_head * cfg.n_heads != cfg.d_model),
            ("qk_norm must be False", cfg.qk_norm),
            ("sliding_window must be None", cfg.sliding_window is not None),
            ("attn_scale must be None or 1.0", not scale_ok and cfg.attn_scale != 1.0)) if bad]
        return "gpt2", wrong
    if cfg.position != "rope":
        return "none", wrong + [f"position={cfg.position!r} (HF families here use 'rope' or "
                                f"'learned')"]
    family = ("qwen3" if cfg.qk_norm else "mistral" if cfg.sliding_window is not None
              else "qwen2" if cfg.qkv_bias and not cfg.out_bias else "llama")
    if moe_family is not None:
        family = moe_family
        wrong += moe_wrong(cfg, family)
    wrong += [why for why, bad in (
        ("norm must be 'rms'", cfg.norm != "rms"),
        ("gated_mlp must be True", not cfg.gated_mlp),
        ("rope_layout must be 'half'", cfg.rope_layout != "half" and family != "deepseek_v3"),
        ("rotary_fraction must be 1", cfg.rotary_fraction != 1),
        ("attn_scale must be None", not scale_ok),
        ("qkv_bias must equal out_bias", family in ("llama", "qwen3", "qwen3_moe", "deepseek_v3")
         and cfg.qkv_bias != cfg.out_bias),
        ("no biases allowed", family in ("mistral", "mixtral") and (cfg.qkv_bias or cfg.out_bias)),
        ("qkv_bias must be True and out_bias False", family == "qwen2_moe"
         and (not cfg.qkv_bias or cfg.out_bias)),
        ("sliding_window must be None", family not in ("mistral", "mixtral")
         and cfg.sliding_window is not None),
        ("mlp_bias must be False", family != "llama" and cfg.mlp_bias)) if bad]
    return family, wrong


def _rope_to_hf(cfg: Config) -> dict[str, Any]:
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


def hf_config_from(cfg: Config) -> dict[str, Any]:
    """A transformers-5 config.json dict describing the same model as cfg."""
    family, wrong = _pick_family(cfg)
    if wrong:
        raise ValueError(f"this Config has no Hugging Face equivalent (closest family: "
                         f"{family}): {'; '.join(wrong)}")
    act = {"gelu_tanh": "gelu_new" if family == "gpt2" else "gelu_pytorch_tanh"}
    activation = act.get(cfg.activation, cfg.activation)
    common = {"model_type": family, "architectures": [ARCHITECTURES[family]],
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "dtype": cfg.param_dtype}
    if family == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim, "n_positions": cfg.max_position,
                "activation_function": activation, "layer_norm_epsilon": cfg.norm_eps,
                "scale_attn_weights": cfg.attn_scale != 1.0,
                "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    sc = cfg.rope_scaling
    hf = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_per_head,
          "hidden_act": activation, "rms_norm_eps": cfg.norm_eps,
          # dynamic NTK grows past max_position_embeddings in HF: make it the original length
          "max_position_embeddings": (sc.original_max_position if sc and sc.kind == "dynamic"
                                      else cfg.max_position),
          "rope_parameters": _rope_to_hf(cfg)}
    if family == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif family == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
        if family == "qwen3":
            hf.update(attention_bias=cfg.qkv_bias)
    if family in MOE_FAMILIES:
        hf.update(hf_fields(cfg, family))
    return hf


# Tensor layout rules ----------------------------------------------------------------
Path = tuple[str | int, ...]
_G = "<group>"      # stands for the scan group that holds layer i (resolved per layer)
_B = ("blocks", _G)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One HF tensor ("{i}" = layer index) ⇄ the jaxlm Params it fills (one layer's slice
    for per-layer names). `load` maps the HF array to one array per path; `save` inverts."""
    hf: str
    paths: tuple[Path, ...]
    shape: tuple[int, ...]
    load: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    save: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    layers: tuple[int, ...] | None = None  # per-layer rules: only these layers (None = all)
    index: tuple[int, ...] = ()            # where inside one layer's slice (e.g. expert j)
    slot_shape: tuple[int, ...] | None = None  # that slice's full shape when index is set

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _linear(hf, path, in_shape, out_shape, conv1d=False) -> _Rule:
    """torch Linear weight [out, in] (GPT-2 Conv1D: [in, out]) ⇄ kernel [*in, *out]."""
    n_in, n_out, full = math.prod(in_shape), math.prod(out_shape), (*in_shape, *out_shape)
    if conv1d:
        return _Rule(hf, (path,), (n_in, n_out), lambda w: (w.reshape(full),),
                     lambda k: k[0].reshape(n_in, n_out))
    return _Rule(hf, (path,), (n_out, n_in), lambda w: (w.T.reshape(full),),
                 lambda k: k[0].reshape(n_in, n_out).T)


def _vector(hf, path, shape) -> _Rule:
    n = math.prod(shape)
    return _Rule(hf, (path,), (n,), lambda b: (b.reshape(shape),), lambda b: b[0].reshape(n))


def _table(hf, path, shape) -> _Rule:
    return _Rule(hf, (path,), tuple(shape), lambda w: (w,), lambda w: w[0])


def _fused_qkv(hf, prefix, in_shape, heads, hd) -> _Rule:
    """GPT-2's c_attn: one [.., 3·h·hd] tensor split into q, k, v along the last axis."""
    paths = tuple((*_B, "attn", f"{n}_proj", prefix) for n in "qkv")
    shape = (*in_shape, 3 * heads * hd)
    return _Rule(hf, paths, shape,
                 lambda w: tuple(p.reshape(*in_shape, heads, hd) for p in np.split(w, 3, -1)),
                 lambda ps: np.concatenate([p.reshape(*in_shape, -1) for p in ps], -1))


def _llama_rules(cfg: Config) -> list[_Rule]:
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    h, kh, hd = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    L, A, M = "model.layers.{i}.", (*_B, "attn"), (*_B, "mlp")
    rules = [_table("model.embed_tokens.weight", ("embed", "embedding"), (v, d)),
             _vector("model.norm.weight", ("final_norm", "scale"), (d,)),
             _vector(L + "input_layernorm.weight", (*_B, "attn_norm", "scale"), (d,)),
             _vector(L + "post_attention_layernorm.weight", (*_B, "mlp_norm", "scale"), (d,)),
             _linear(L + "self_attn.o_proj.weight", (*A, "o_proj", "kernel"), (h, hd), (d,))]
    for name, heads in (("q", h), ("k", kh), ("v", kh)):
        p = f"self_attn.{name}_proj."
        rules.append(_linear(L + p + "weight", (*A, f"{name}_proj", "kernel"), (d,), (heads, hd)))
        if cfg.qkv_bias:
            rules.append(_vector(L + p + "bias", (*A, f"{name}_proj", "bias"), (heads, hd)))
    if cfg.out_bias:
        rules.append(_vector(L + "self_attn.o_proj.bias", (*A, "o_proj", "bias"), (d,)))
    if cfg.qk_norm:
        rules += [_vector(L + f"self_attn.{n}_norm.weight", (*A, f"{n}_norm", "scale"), (hd,))
                  for n in "qk"]
    for hf_name, name, i, o in (("gate_proj", "gate", d, f), ("up_proj", "up", d, f),
                                ("down_proj", "down", f, d)):
        rules.append(_linear(L + f"mlp.{hf_name}.weight", (*M, name, "kernel"), (i,), (o,)))
        if cfg.mlp_bias:
            rules.append(_vector(L + f"mlp.{hf_name}.bias", (*M, name, "bias"), (o,)))
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    return rules


def _gpt2_rules(cfg: Config) -> list[_Rule]:
    d, f, v, h, hd = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_heads, cfg.dim_per_head
    L, A, M = "transformer.h.{i}.", (*_B, "attn"), (*_B, "mlp")
    rules = [_table("transformer.wte.weight", ("embed", "embedding"), (v, d)),
             _table("transformer.wpe.weight", ("pos_embed",), (cfg.max_position, d)),
             _vector("transformer.ln_f.weight", ("final_norm", "scale"), (d,)),
             _vector("transformer.ln_f.bias", ("final_norm", "bias"), (d,)),
             _fused_qkv(L + "attn.c_attn.weight", "kernel", (d,), h, hd),
             _fused_qkv(L + "attn.c_attn.bias", "bias", (), h, hd),
             _linear(L + "attn.c_proj.weight", (*A, "o_proj", "kernel"), (h, hd), (d,), True),
             _vector(L + "attn.c_proj.bias", (*A, "o_proj", "bias"), (d,)),
             _linear(L + "mlp.c_fc.weight", (*M, "up", "kernel"), (d,), (f,), True),
             _vector(L + "mlp.c_fc.bias", (*M, "up", "bias"), (f,)),
             _linear(L + "mlp.c_proj.weight", (*M, "down", "kernel"), (f,), (d,), True),
             _vector(L + "mlp.c_proj.bias", (*M, "down", "bias"), (d,))]
    for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        rules += [_vector(L + f"{hf_norm}.{w}", (*_B, norm, p), (d,))
                  for w, p in (("weight", "scale"), ("bias", "bias"))]
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    return rules


def _moe_rules(family: str, cfg: Config) -> list[_Rule]:
    """Llama-style rules with MLA attention (DeepSeek) and experts on the MoE layers."""
    base = _llama_rules(cfg)
    is_mlp, is_attn = (lambda r: ".mlp." in r.hf), (lambda r: ".self_attn." in r.hf)
    attn = ([r for r in base if is_attn(r)] if family != "deepseek_v3" else
            mla_rules("model.layers.{i}.", cfg, _linear, _vector))
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    return ([r for r in base if not is_mlp(r) and not is_attn(r)] + attn
            + only(dense, [r for r in base if is_mlp(r)])
            + only(moe, expert_rules(_Rule, "model.layers.{i}." + (
                "block_sparse_moe." if family == "mixtral" else "mlp."), cfg, _linear, _vector)))


def _rules(family: str, cfg: Config) -> list[_Rule]:
    if family in MOE_FAMILIES:
        return _moe_rules(family, cfg)
    return _gpt2_rules(cfg) if family == "gpt2" else _llama_rules(cfg)


def only(layers, rules: list[_Rule]) -> list[_Rule]:
    """The same rules restricted to some layers (dense vs MoE layers of one model)."""
    return [dataclasses.replace(r, layers=tuple(layers)) for r in rules]


def _layer_slots(cfg: Config) -> list[tuple[int, int]]:
    """Layer i → (scan group, index inside the group)."""
    return [(g, j) for g, (_, n) in enumerate(cfg.layer_groups()) for j in range(n)]


def _at(path: Path, group: int) -> Path:
    return tuple(group if part == _G else part for part in path)


def _layers(rule: _Rule, cfg: Config) -> list[int | None]:
    if not rule.per_layer:
        return [None]
    return list(range(cfg.n_layers) if rule.layers is None else rule.layers)


def _names(rule: _Rule, cfg: Config) -> list[str]:
    return [rule.hf if i is None else rule.hf.format(i=i) for i in _layers(rule, cfg)]


# safetensors, read without pickle ---------------------------------------------------
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def read(self) -> np.ndarray:
        count = math.prod(self.shape)
        return np.fromfile(self.file, self.dtype, count, offset=self.offset).reshape(self.shape)


def _read_header(file: str) -> dict[str, _Tensor]:
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, shape = jnp.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
        start, end = info["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{file}: tensor {name} header is corrupt (offsets {start}..{end} "
                             f"do not hold {shape} {dtype})")
        out[name] = _Tensor(file, dtype, shape, 8 + n + start)
    return out


def _checkpoint_tensors(path: str) -> dict[str, _Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path!r} has no *.safetensors files (pickled pytorch_model.bin is "
                         f"not read; re-save with save_pretrained(safe_serialization=True))")
    tensors: dict[str, _Tensor] = {}
    for file in files:
        for name, t in _read_header(file).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in both {tensors[name].file} and {file}")
            tensors[name] = t
    return tensors


# Import ------------------------------------------------------------------------------
def _canonical(tensors: dict[str, _Tensor], family: str) -> dict[str, tuple[str, _Tensor]]:
    """Names as the *ForCausalLM model spells them → (name in the file, tensor). A base
    model's checkpoint (LlamaModel, GPT2Model) lacks the "model."/"transformer." prefix."""
    prefix = _PREFIX[family]
    bare = not any(n.startswith(prefix) for n in tensors)
    return {(prefix + n if bare and n != "lm_head.weight" else n): (n, t)
            for n, t in tensors.items()}


def _check(rules, tensors, cfg: Config) -> None:
    """One ValueError naming every missing, unexpected and wrongly shaped tensor."""
    expected = {n: r.shape for r in rules for n in _names(r, cfg)}
    missing = sorted(n for n in expected if n not in tensors)
    shapes = sorted(f"{tensors[n][0]}: expected {list(s)}, got {list(tensors[n][1].shape)}"
                    for n, s in expected.items() if n in tensors and tensors[n][1].shape != s)
    # a tied checkpoint may still store the head; transformers ignores it too
    ignorable = lambda n: bool(_BUFFERS.search(n)) or (cfg.tie_embeddings and n == "lm_head.weight")
    unexpected = sorted(tensors[n][0] for n in tensors if n not in expected and not ignorable(n))
    problems = [f"{title} ({len(items)}): " + ", ".join(items) for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
    if problems:
        raise ValueError("checkpoint does not match its config.json:\n  " + "\n  ".join(problems))


def _convert(rules, tensors, cfg: Config) -> dict[Path, np.ndarray]:
    """Every Param's full value (layers stacked per scan group), in the param dtype."""
    dtype, slots = jnp.dtype(cfg.param_dtype), _layer_slots(cfg)
    sizes = [n for _, n in cfg.layer_groups()]
    out: dict[Path, np.ndarray] = {}
    for rule in rules:
        for i, name in zip(_layers(rule, cfg), _names(rule, cfg)):
            parts = rule.load(tensors[name][1].read())
            for path, part in zip(rule.paths, parts):
                if i is None:
                    out[path] = part.astype(dtype)
                    continue
                g, j = slots[i]
                where = _at(path, g)
                if where not in out:
                    out[where] = np.empty((sizes[g], *(rule.slot_shape or part.shape)), dtype)
                out[where][(j, *rule.index)] = part
    return out


def _dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    return name


def from_hf(path: str, dtype=None, param_dtype=None, mesh=None) -> CausalLM:
    """Load a local HF checkpoint directory (config.json + *.safetensors, sharded or not).

    param_dtype defaults to the checkpoint's dtype (config.json `dtype`/`torch_dtype`,
    else the stored embedding's), dtype (compute) to param_dtype. With a mesh, each
    tensor goes from host memory straight into its shards (logical-axis rules).
    """
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    family = _family(hf)
    tensors = _canonical(_checkpoint_tensors(path), family)
    if "tie_word_embeddings" not in hf and "lm_head.weight" not in tensors:
        hf["tie_word_embeddings"] = True  # unstated in config.json and no head stored: tied
    cfg = config_from_hf(hf)
    stored = next((t.dtype.name for n, (_, t) in tensors.items() if "embed" in n or "wte" in n),
                  None)
    param_dtype = _dtype_name(param_dtype or _dtype_from_hf(hf) or
                              (stored if stored in DTYPES else "float32"))
    cfg = cfg.replace(param_dtype=param_dtype, dtype=_dtype_name(dtype or param_dtype))

    rules = _rules(family, cfg)
    _check(rules, tensors, cfg)
    values = _convert(rules, tensors, cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    params = dict(nnx.to_flat_state(state))
    want, got = ({p: v.shape for p, v in d.items()} for d in (params, values))
    if want != got:  # a bug in the rules, not in the checkpoint
        diff = sorted(str(p) for p in set(want) | set(got) if want.get(p) != got.get(p))
        raise AssertionError(f"jaxlm.model.hf rules are out of date with CausalLM: {diff}")
    for path, var in params.items():  # assigned only now that everything converted
        if mesh is None:
            var.set_value(jnp.asarray(values[path]))
        else:
            spec = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, mesh)
            var.set_value(jax.device_put(values[path], NamedSharding(mesh, spec)))
    return nnx.merge(graphdef, state)


# Export ------------------------------------------------------------------------------
def to_hf(lm: CausalLM, path: str, dtype=None) -> None:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads
    with no missing or unexpected weights. dtype defaults to the model's param_dtype."""
    import safetensors.numpy  # the writer; reading above needs no library

    cfg = lm.cfg
    hf = hf_config_from(cfg)
    dtype = _dtype_name(dtype or cfg.param_dtype)
    hf["dtype"] = dtype
    params = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(lm))}
    tensors = {}
    slots = _layer_slots(cfg)
    for rule in _rules(hf["model_type"], cfg):
        for i, name in zip(_layers(rule, cfg), _names(rule, cfg)):
            parts = tuple(params[p] if i is None else
                          params[_at(p, slots[i][0])][(slots[i][1], *rule.index)]
                          for p in rule.paths)
            tensors[name] = np.ascontiguousarray(rule.save(parts).astype(jnp.dtype(dtype)))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"),
                                metadata={"format": "pt"})
