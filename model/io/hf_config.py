"""Hugging Face config.json ⇄ Config, for Llama 1/2/3, Mistral, Qwen2, Qwen3, GPT-2,
Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3.

Importing fills what config.json leaves out with transformers 5's defaults; exporting picks
the family that holds the Config exactly or names everything no family can represent.
Per-layer patterns (sliding layers, MoE layers) are in hf_layers, RoPE in hf_rope.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..config import DTYPES, Config
from .hf_layers import (moe_layers_from_hf, moe_layers_to_hf, moe_layers_wrong,
                        windows_from_hf, windows_to_hf, windows_wrong)
from .hf_rope import rope_from_hf, rope_to_hf

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}
# HF defaults for keys a config.json may leave out (transformers' config classes).
_MAX_POSITION = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768,
                 "mixtral": 131072, "qwen2_moe": 32768, "qwen3_moe": 32768,
                 "deepseek_v3": 4096}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh"}


def family_of(hf: Mapping[str, Any]) -> str:
    """The family of a config.json: its model_type, else (none given) its architecture."""
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


def dtype_from_hf(hf: Mapping[str, Any]) -> str | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    return name if name in DTYPES else None


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"HF activation {name!r} is not supported; known: "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# config.json → Config ---------------------------------------------------------------------
def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The jaxlm Config of a Hugging Face config.json (a dict, or a transformers config)."""
    hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    family = family_of(hf)
    dtype = dtype_from_hf(hf) or "float32"
    if family == "gpt2":
        return _gpt2_config(hf, dtype)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    absent = [k for k in required if hf.get(k) is None]
    if absent:
        raise ValueError(f"{family} config.json lacks {absent}")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    max_position = hf.get("max_position_embeddings") or _MAX_POSITION[family]
    theta, scaling, fraction = rope_from_hf(hf, max_position)
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
    fields.update(_family_fields(hf, family))
    fields.update(windows_from_hf(hf, family))
    fields.update(moe_layers_from_hf(hf, family))
    return Config(**fields)


def _family_fields(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Config fields that differ between the Llama-style families (layer patterns aside)."""
    bias = bool(hf.get("attention_bias", False))
    if family == "llama":
        return dict(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if family == "qwen2":
        return dict(qkv_bias=True)
    if family == "qwen3":
        return dict(qk_norm=True, qkv_bias=bias, out_bias=bias)
    if family == "mixtral":
        return dict(n_experts=hf.get("num_local_experts", 8),
                    n_experts_per_tok=hf.get("num_experts_per_tok", 2), norm_topk_prob=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        fields = dict(n_experts=hf.get("num_experts", hf.get("num_local_experts")),
                      n_experts_per_tok=hf.get("num_experts_per_tok", 4),
                      moe_ffn_dim=hf["moe_intermediate_size"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        if family == "qwen2_moe":
            return dict(fields, qkv_bias=bool(hf.get("qkv_bias", True)),
                        shared_expert_gate=True,
                        shared_ffn_dim=hf["shared_expert_intermediate_size"])
        return dict(fields, qk_norm=True, qkv_bias=bias, out_bias=bias)
    if family == "deepseek_v3":
        return dict(
            attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], head_dim=None, n_kv_heads=None, qkv_bias=bias,
            out_bias=bias, rope_layout="interleaved" if hf.get("rope_interleave", True) else "half",
            n_experts=hf["n_routed_experts"], n_experts_per_tok=hf["num_experts_per_tok"],
            moe_ffn_dim=hf["moe_intermediate_size"],
            n_shared_experts=hf.get("n_shared_experts") or 0, router="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            mtp_depth=hf.get("num_nextn_predict_layers") or 0)
    return {}  # mistral: only its window differs from Llama


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


# Config → config.json ---------------------------------------------------------------------
def _family_for(cfg: Config) -> str:
    """The one family that could hold cfg, judged by its distinctive features."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.attention == "mla":
        return "deepseek_v3"  # the only MLA family in transformers
    if cfg.n_experts:
        return ("qwen2_moe" if cfg.shared_expert_gate else
                "qwen3_moe" if cfg.qk_norm else "mixtral")
    windows = {cfg.layer_window(i) for i in range(cfg.n_layers)}
    if cfg.qk_norm:
        return "qwen3"
    if len(windows) > 1 or (cfg.qkv_bias and not cfg.out_bias):
        return "qwen2"  # per-layer windows need layer_types: Qwen2 (or Qwen3 above)
    return "mistral" if windows != {None} else "llama"


def _wrong(cfg: Config, family: str) -> list[str]:
    """What `family` cannot represent about cfg (empty when it holds cfg exactly)."""
    plain = (("post_norm", False), ("attn_softcap", None), ("final_softcap", None))
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"):
        plain += (("attention", "gqa"), ("n_experts", 0))
    wrong = [f"{f}={getattr(cfg, f)!r}" for f, ok in plain if getattr(cfg, f) != ok]
    if cfg.medusa_heads:
        wrong.append(f"medusa_heads={cfg.medusa_heads} (Medusa heads have no transformers "
                     f"layout; export the model without them: "
                     f"jaxlm.model.build.with_heads(lm, lm.cfg.mtp_depth, 0))")
    if cfg.mtp_depth and family != "deepseek_v3":
        wrong.append(f"mtp_depth={cfg.mtp_depth} (only deepseek_v3 stores MTP layers; export "
                     f"without them: jaxlm.model.build.with_heads(lm, 0, lm.cfg.medusa_heads))")
    wrong += windows_wrong(cfg, family) + moe_layers_wrong(cfg, family)
    scale_ok = cfg.attn_scale is None or math.isclose(cfg.attn_scale, cfg.dim_per_head ** -0.5)
    if family == "gpt2":
        return wrong + _gpt2_wrong(cfg, scale_ok)
    if cfg.position != "rope":
        return wrong + [f"position={cfg.position!r} (HF families here use 'rope' or 'learned')"]
    moe, deepseek = family in ("mixtral", "qwen2_moe", "qwen3_moe"), family == "deepseek_v3"
    return wrong + [why for why, bad in (
        ("norm must be 'rms'", cfg.norm != "rms"),
        ("gated_mlp must be True", not cfg.gated_mlp),
        ("rope_layout must be 'half'", cfg.rope_layout != "half" and not deepseek),
        ("rotary_fraction must be 1", cfg.rotary_fraction != 1),
        ("attn_scale must be None", not scale_ok),
        ("qkv_bias must equal out_bias", family in ("llama", "qwen3", "qwen3_moe", "deepseek_v3")
         and cfg.qkv_bias != cfg.out_bias),
        ("no biases allowed", family in ("mistral", "mixtral") and (cfg.qkv_bias or cfg.out_bias)),
        ("qkv_bias must be True and out_bias False", family == "qwen2"
         and (not cfg.qkv_bias or cfg.out_bias)),
        ("out_bias must be False", family == "qwen2_moe" and cfg.out_bias),
        ("mlp_bias must be False", family != "llama" and cfg.mlp_bias),
        ("router must be 'softmax'", moe and cfg.router != "softmax"),
        ("norm_topk_prob must be True", family == "mixtral" and not cfg.norm_topk_prob),
        ("routed_scaling_factor must be 1", moe and cfg.routed_scaling_factor != 1),
        ("no shared experts", family in ("mixtral", "qwen3_moe")
         and (cfg.n_shared_experts or cfg.shared_ffn_dim)),
        ("router must be 'sigmoid' with n_experts > 0", deepseek
         and (cfg.router != "sigmoid" or not cfg.n_experts)),
        ("shared_ffn_dim must be set", family == "qwen2_moe" and not cfg.shared_ffn_dim)) if bad]


def _gpt2_wrong(cfg: Config, scale_ok: bool) -> list[str]:
    bias = cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias
    return [why for why, bad in (
        ("norm must be 'layer'", cfg.norm != "layer"),
        ("gated_mlp must be False", cfg.gated_mlp),
        ("qkv_bias, out_bias and mlp_bias must all be True", not bias),
        ("n_kv_heads must equal n_heads", cfg.num_kv_heads != cfg.n_heads),
        ("head_dim must be d_model // n_heads", cfg.dim_per_head * cfg.n_heads != cfg.d_model),
        ("qk_norm must be False", cfg.qk_norm),
        ("attn_scale must be None or 1.0", not scale_ok and cfg.attn_scale != 1.0)) if bad]


def hf_config_from(cfg: Config) -> dict[str, Any]:
    """A transformers-5 config.json dict describing the same model as cfg."""
    family = _family_for(cfg)
    wrong = _wrong(cfg, family)
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
    return {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_per_head,
            "hidden_act": activation, "rms_norm_eps": cfg.norm_eps,
            # dynamic NTK grows past max_position_embeddings in HF: make it the original length
            "max_position_embeddings": (sc.original_max_position if sc and sc.kind == "dynamic"
                                        else cfg.max_position),
            "rope_parameters": rope_to_hf(cfg), **_family_keys(cfg, family),
            **windows_to_hf(cfg, family), **moe_layers_to_hf(cfg, family)}


def _family_keys(cfg: Config, family: str) -> dict[str, Any]:
    """The inverse of _family_fields."""
    f = cfg.moe_ffn_dim or cfg.ffn_dim
    qwen_moe = dict(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                    moe_intermediate_size=f, norm_topk_prob=cfg.norm_topk_prob)
    if family == "llama":
        return dict(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if family == "qwen3":
        return dict(attention_bias=cfg.qkv_bias)
    if family == "qwen3_moe":
        return dict(qwen_moe, attention_bias=cfg.qkv_bias)
    if family == "qwen2_moe":
        return dict(qwen_moe, shared_expert_intermediate_size=cfg.shared_ffn_dim,
                    qkv_bias=cfg.qkv_bias)
    if family == "mixtral":
        return dict(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok)
    if family == "deepseek_v3":
        return dict(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                    qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                    v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim,
                    num_key_value_heads=cfg.n_heads, attention_bias=cfg.qkv_bias,
                    rope_interleave=cfg.rope_layout == "interleaved",
                    n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                    moe_intermediate_size=f, n_shared_experts=cfg.n_shared_experts,
                    norm_topk_prob=cfg.norm_topk_prob,
                    routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
                    topk_group=cfg.topk_group, num_nextn_predict_layers=cfg.mtp_depth)
    return {}  # qwen2, mistral: layout fixed by the family (windows in hf_layers)
