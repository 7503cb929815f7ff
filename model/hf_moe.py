"""The MoE and MLA families of jaxlm.model.hf: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3.

Same `_Rule` lists as the dense families (hf.py), with dense-MLP rules restricted to the
dense layers and expert rules to the MoE layers. transformers 5 stores each layer's
experts fused in memory, but save_pretrained (and the Hub) store one tensor per expert.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from .config import Config

FAMILIES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def moe_fields(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Config fields of an MoE/MLA family beyond the Llama-style ones hf.py reads."""
    if family == "mixtral":
        return dict(n_experts=hf.get("num_local_experts", 8),
                    n_experts_per_tok=hf.get("num_experts_per_tok", 2),
                    sliding_window=hf.get("sliding_window"), norm_topk_prob=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers"):
            raise ValueError(f"{family}: mlp_only_layers={hf['mlp_only_layers']} is not "
                             f"supported (dense layers only via decoder_sparse_step)")
        n_experts = hf.get("num_experts", hf.get("num_local_experts"))  # Qwen3-MoE renamed it
        fields = dict(n_experts=n_experts, n_experts_per_tok=hf.get("num_experts_per_tok", 4),
                      moe_ffn_dim=hf["moe_intermediate_size"],
                      moe_every=hf.get("decoder_sparse_step", 1),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        if family == "qwen2_moe":
            fields.update(qkv_bias=True, shared_ffn_dim=hf["shared_expert_intermediate_size"],
                          shared_expert_gate=True)
        else:
            bias = bool(hf.get("attention_bias", False))
            fields.update(qk_norm=True, qkv_bias=bias, out_bias=bias)
        return fields
    bias = bool(hf.get("attention_bias", False))
    return dict(  # deepseek_v3
        attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], head_dim=None, n_kv_heads=None, qkv_bias=bias,
        out_bias=bias, rope_layout="interleaved" if hf.get("rope_interleave", True) else "half",
        n_experts=hf["n_routed_experts"], n_experts_per_tok=hf["num_experts_per_tok"],
        moe_ffn_dim=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0,
        router="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        first_k_dense=hf.get("first_k_dense_replace", 0))


def hf_fields(cfg: Config, family: str) -> dict[str, Any]:
    """The inverse of moe_fields: what config.json needs beyond the Llama-style keys."""
    f = cfg.moe_ffn_dim or cfg.ffn_dim
    if family == "mixtral":
        return dict(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                    sliding_window=cfg.sliding_window)
    if family in ("qwen2_moe", "qwen3_moe"):
        out = dict(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                   moe_intermediate_size=f, decoder_sparse_step=cfg.moe_every,
                   norm_topk_prob=cfg.norm_topk_prob, mlp_only_layers=[],
                   use_sliding_window=False, sliding_window=None)
        if family == "qwen2_moe":
            out.update(shared_expert_intermediate_size=cfg.shared_ffn_dim)
        else:
            out.update(attention_bias=cfg.qkv_bias)
        return out
    return dict(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim,
                num_key_value_heads=cfg.n_heads, attention_bias=cfg.qkv_bias,
                rope_interleave=cfg.rope_layout == "interleaved",
                n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                moe_intermediate_size=f, n_shared_experts=cfg.n_shared_experts,
                norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
                topk_group=cfg.topk_group, first_k_dense_replace=cfg.first_k_dense)


def family_of(cfg: Config) -> str | None:
    """The MoE/MLA family that can hold cfg, or None for a dense GQA model."""
    if cfg.attention == "mla":
        return "deepseek_v3"
    if not cfg.n_experts:
        return None
    if cfg.shared_expert_gate:
        return "qwen2_moe"
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


def moe_wrong(cfg: Config, family: str) -> list[str]:
    """What this family cannot represent about cfg."""
    checks = [("router must be 'softmax'", family != "deepseek_v3" and cfg.router != "softmax"),
              ("first_k_dense must be 0", family != "deepseek_v3" and cfg.first_k_dense),
              ("moe_every must be 1", family in ("mixtral", "deepseek_v3") and cfg.moe_every != 1),
              ("norm_topk_prob must be True", family == "mixtral" and not cfg.norm_topk_prob),
              ("routed_scaling_factor must be 1", family != "deepseek_v3"
               and cfg.routed_scaling_factor != 1),
              ("no shared experts", family in ("mixtral", "qwen3_moe")
               and (cfg.n_shared_experts or cfg.shared_ffn_dim)),
              ("router must be 'sigmoid' with n_experts > 0", family == "deepseek_v3"
               and (cfg.router != "sigmoid" or not cfg.n_experts)),
              ("shared_ffn_dim must be set", family == "qwen2_moe" and not cfg.shared_ffn_dim)]
    return [why for why, bad in checks if bad]


def expert_rules(rule_cls, prefix: str, cfg: Config, linear, vector) -> list:
    """Router (+ selection bias), fused experts and shared experts of one MoE layer."""
    e, d, f = cfg.n_experts, cfg.d_model, cfg.moe_ffn_dim or cfg.ffn_dim
    M = ("blocks", "<group>", "mlp")

    # On disk (what save_pretrained writes and the Hub holds) each expert is separate:
    # Mixtral experts.{j}.w1/w3/w2, the others experts.{j}.gate_proj/up_proj/down_proj.
    names = (("w1", "w3", "w2") if prefix.endswith("block_sparse_moe.")
             else ("gate_proj", "up_proj", "down_proj"))
    rules = [linear(prefix + "gate.weight", (*M, "router"), (d,), (e,))]
    for j in range(e):
        for hf_name, ours, i, o in ((names[0], "gate", d, f), (names[1], "up", d, f),
                                    (names[2], "down", f, d)):
            r = linear(f"{prefix}experts.{j}.{hf_name}.weight", (*M, ours), (i,), (o,))
            rules.append(dataclasses.replace(r, index=(j,), slot_shape=(e, i, o)))
    if cfg.router == "sigmoid":
        rules.append(vector(prefix + "gate.e_score_correction_bias", (*M, "router_bias"), (e,)))
    shared_f = cfg.shared_ffn_dim or cfg.n_shared_experts * f
    if shared_f:
        sp = prefix + ("shared_expert." if cfg.shared_expert_gate else "shared_experts.")
        rules += [linear(sp + "gate_proj.weight", (*M, "shared_gate_proj"), (d,), (shared_f,)),
                  linear(sp + "up_proj.weight", (*M, "shared_up"), (d,), (shared_f,)),
                  linear(sp + "down_proj.weight", (*M, "shared_down"), (shared_f,), (d,))]
    if cfg.shared_expert_gate:
        rules.append(rule_cls(prefix + "shared_expert_gate.weight", ((*M, "shared_expert_gate"),),
                              (1, d), lambda w: (w.reshape(d),), lambda p: p[0].reshape(1, d)))
    return rules


def mla_rules(prefix: str, cfg: Config, linear, vector) -> list:
    """DeepSeek's MLA projections of one layer."""
    d, h = cfg.d_model, cfg.n_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    A, P = ("blocks", "<group>", "attn"), prefix + "self_attn."
    rules = [linear(P + "kv_a_proj_with_mqa.weight", (*A, "kv_a", "kernel"), (d,), (r + dr,)),
             vector(P + "kv_a_layernorm.weight", (*A, "kv_a_norm", "scale"), (r,)),
             linear(P + "kv_b_proj.weight", (*A, "kv_b", "kernel"), (r,), (h, dn + dv)),
             linear(P + "o_proj.weight", (*A, "o_proj", "kernel"), (h, dv), (d,))]
    if cfg.q_lora_rank:
        rq = cfg.q_lora_rank
        rules += [linear(P + "q_a_proj.weight", (*A, "q_a", "kernel"), (d,), (rq,)),
                  vector(P + "q_a_layernorm.weight", (*A, "q_a_norm", "scale"), (rq,)),
                  linear(P + "q_b_proj.weight", (*A, "q_b", "kernel"), (rq,), (h, dn + dr))]
    else:
        rules.append(linear(P + "q_proj.weight", (*A, "q_proj", "kernel"), (d,), (h, dn + dr)))
    if cfg.qkv_bias:
        rules.append(vector(P + "kv_a_proj_with_mqa.bias", (*A, "kv_a", "bias"), (r + dr,)))
        if cfg.q_lora_rank:
            rules.append(vector(P + "q_a_proj.bias", (*A, "q_a", "bias"), (cfg.q_lora_rank,)))
    if cfg.out_bias:
        rules.append(vector(P + "o_proj.bias", (*A, "o_proj", "bias"), (d,)))
    return rules
