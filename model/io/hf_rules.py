"""Where every Hugging Face tensor goes in a CausalLM, for every family, as one list of
`Rule`s per (family, Config). Reading and writing walk the same list, so import and export
cannot drift apart.

A rule names one HF tensor ("{i}" = layer index), the jaxlm Params it fills (one layer's
slice for per-layer names) and how the layout changes. Rules are composed per layer part:
embeddings and head, norms, attention (GQA, GPT-2's fused c_attn, or DeepSeek's MLA), and
the feed-forward (a dense MLP on dense layers, router + experts on MoE layers). transformers
5 keeps each layer's experts fused in memory, but save_pretrained (and the Hub) store one
tensor per expert, which is what is read and written here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import numpy as np

from ..config import Config

Path = tuple[str | int, ...]
GROUP = "<group>"       # stands for the scan group that holds layer i (resolved per layer)
_B = ("blocks", GROUP)
_A, _M = (*_B, "attn"), (*_B, "mlp")
# What a *ForCausalLM model puts before its decoder's tensor names.
PREFIX = {"gpt2": "transformer."}
LAYER = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor ⇄ the jaxlm Params it fills. `load` maps the HF array to one array
    per path; `save` inverts it."""
    hf: str
    paths: tuple[Path, ...]
    shape: tuple[int, ...]
    load: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    save: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    layers: tuple[int, ...] | None = None  # per-layer rules: only these layers (None = all)
    index: tuple[int, ...] = ()            # where inside one layer's slice (e.g. expert j)
    slot_shape: tuple[int, ...] | None = None  # that slice's full shape when index is set
    copy: bool = False   # a stored duplicate of a Param another rule fills (DeepSeek-V3's
                         # MTP layers repeat the shared embedding and head): checked equal

    def instances(self, cfg: Config) -> list[tuple[int | None, str]]:
        """(layer or None, HF tensor name) for every tensor this rule stands for."""
        if "{i}" not in self.hf:
            return [(None, self.hf)]
        layers = range(cfg.n_layers) if self.layers is None else self.layers
        return [(i, self.hf.format(i=i)) for i in layers]


def layer_slots(cfg: Config) -> list[tuple[int, int]]:
    """Layer i → (scan group, index inside the group)."""
    return [(g, j) for g, (_, n) in enumerate(cfg.layer_groups()) for j in range(n)]


def at(path: Path, group: int) -> Path:
    return tuple(group if part == GROUP else part for part in path)


# Rule builders -------------------------------------------------------------------------
def _linear(hf, path, in_shape, out_shape, conv1d=False) -> Rule:
    """torch Linear weight [out, in] (GPT-2 Conv1D: [in, out]) ⇄ kernel [*in, *out]."""
    n_in, n_out, full = math.prod(in_shape), math.prod(out_shape), (*in_shape, *out_shape)
    if conv1d:
        return Rule(hf, (path,), (n_in, n_out), lambda w: (w.reshape(full),),
                    lambda k: k[0].reshape(n_in, n_out))
    return Rule(hf, (path,), (n_out, n_in), lambda w: (w.T.reshape(full),),
                lambda k: k[0].reshape(n_in, n_out).T)


def _vector(hf, path, shape) -> Rule:
    n = math.prod(shape)
    return Rule(hf, (path,), (n,), lambda b: (b.reshape(shape),), lambda b: b[0].reshape(n))


def _table(hf, path, shape) -> Rule:
    return Rule(hf, (path,), tuple(shape), lambda w: (w,), lambda w: w[0])


def _fused_qkv(hf, param, in_shape, heads, hd) -> Rule:
    """GPT-2's c_attn: one [.., 3·h·hd] tensor split into q, k, v along the last axis."""
    paths = tuple((*_A, f"{n}_proj", param) for n in "qkv")
    return Rule(hf, paths, (*in_shape, 3 * heads * hd),
                lambda w: tuple(p.reshape(*in_shape, heads, hd) for p in np.split(w, 3, -1)),
                lambda ps: np.concatenate([p.reshape(*in_shape, -1) for p in ps], -1))


def _only(layers: Iterable[int], rules: list[Rule]) -> list[Rule]:
    """The same rules restricted to some layers (dense vs MoE layers of one model)."""
    return [dataclasses.replace(r, layers=tuple(layers)) for r in rules]


# Llama-style families (Llama, Mistral, Qwen2/3, and the MoE/MLA ones) ---------------------
def _outer(cfg: Config) -> list[Rule]:
    d, v = cfg.d_model, cfg.vocab_size
    rules = [_table("model.embed_tokens.weight", ("embed", "embedding"), (v, d)),
             _vector("model.norm.weight", ("final_norm", "scale"), (d,)),
             _vector(LAYER + "input_layernorm.weight", (*_B, "attn_norm", "scale"), (d,)),
             _vector(LAYER + "post_attention_layernorm.weight", (*_B, "mlp_norm", "scale"), (d,))]
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    return rules


def _gqa(cfg: Config) -> list[Rule]:
    d, h, kh, hd = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    P = LAYER + "self_attn."
    rules = [_linear(P + "o_proj.weight", (*_A, "o_proj", "kernel"), (h, hd), (d,))]
    for name, heads in (("q", h), ("k", kh), ("v", kh)):
        rules.append(_linear(P + f"{name}_proj.weight", (*_A, f"{name}_proj", "kernel"),
                             (d,), (heads, hd)))
        if cfg.qkv_bias:
            rules.append(_vector(P + f"{name}_proj.bias", (*_A, f"{name}_proj", "bias"),
                                 (heads, hd)))
    if cfg.out_bias:
        rules.append(_vector(P + "o_proj.bias", (*_A, "o_proj", "bias"), (d,)))
    if cfg.qk_norm:
        rules += [_vector(P + f"{n}_norm.weight", (*_A, f"{n}_norm", "scale"), (hd,))
                  for n in "qk"]
    return rules


def _mla(cfg: Config) -> list[Rule]:
    """DeepSeek's MLA projections: latent KV with a decoupled RoPE key, optional low-rank q."""
    d, h = cfg.d_model, cfg.n_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    P = LAYER + "self_attn."
    rules = [_linear(P + "kv_a_proj_with_mqa.weight", (*_A, "kv_a", "kernel"), (d,), (r + dr,)),
             _vector(P + "kv_a_layernorm.weight", (*_A, "kv_a_norm", "scale"), (r,)),
             _linear(P + "kv_b_proj.weight", (*_A, "kv_b", "kernel"), (r,), (h, dn + dv)),
             _linear(P + "o_proj.weight", (*_A, "o_proj", "kernel"), (h, dv), (d,))]
    if cfg.q_lora_rank:
        rq = cfg.q_lora_rank
        rules += [_linear(P + "q_a_proj.weight", (*_A, "q_a", "kernel"), (d,), (rq,)),
                  _vector(P + "q_a_layernorm.weight", (*_A, "q_a_norm", "scale"), (rq,)),
                  _linear(P + "q_b_proj.weight", (*_A, "q_b", "kernel"), (rq,), (h, dn + dr))]
    else:
        rules.append(_linear(P + "q_proj.weight", (*_A, "q_proj", "kernel"), (d,), (h, dn + dr)))
    if cfg.qkv_bias:
        rules.append(_vector(P + "kv_a_proj_with_mqa.bias", (*_A, "kv_a", "bias"), (r + dr,)))
        if cfg.q_lora_rank:
            rules.append(_vector(P + "q_a_proj.bias", (*_A, "q_a", "bias"), (cfg.q_lora_rank,)))
    if cfg.out_bias:
        rules.append(_vector(P + "o_proj.bias", (*_A, "o_proj", "bias"), (d,)))
    return rules


def _mlp(cfg: Config) -> list[Rule]:
    d, f = cfg.d_model, cfg.ffn_dim
    rules = []
    for hf_name, name, i, o in (("gate_proj", "gate", d, f), ("up_proj", "up", d, f),
                                ("down_proj", "down", f, d)):
        rules.append(_linear(LAYER + f"mlp.{hf_name}.weight", (*_M, name, "kernel"), (i,), (o,)))
        if cfg.mlp_bias:
            rules.append(_vector(LAYER + f"mlp.{hf_name}.bias", (*_M, name, "bias"), (o,)))
    return rules


def _experts(cfg: Config, family: str) -> list[Rule]:
    """Router (+ DeepSeek's selection bias), one tensor per expert, and shared experts."""
    e, d, f = cfg.n_experts, cfg.d_model, cfg.moe_ffn_dim or cfg.ffn_dim
    P = LAYER + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    rules = [_linear(P + "gate.weight", (*_M, "router"), (d,), (e,))]
    for j in range(e):
        for hf_name, ours, i, o in ((names[0], "gate", d, f), (names[1], "up", d, f),
                                    (names[2], "down", f, d)):
            r = _linear(f"{P}experts.{j}.{hf_name}.weight", (*_M, ours), (i,), (o,))
            rules.append(dataclasses.replace(r, index=(j,), slot_shape=(e, i, o)))
    if cfg.router == "sigmoid":
        rules.append(_vector(P + "gate.e_score_correction_bias", (*_M, "router_bias"), (e,)))
    shared_f = cfg.shared_ffn_dim or cfg.n_shared_experts * f
    if shared_f:
        S = P + ("shared_expert." if cfg.shared_expert_gate else "shared_experts.")
        rules += [_linear(S + "gate_proj.weight", (*_M, "shared_gate_proj"), (d,), (shared_f,)),
                  _linear(S + "up_proj.weight", (*_M, "shared_up"), (d,), (shared_f,)),
                  _linear(S + "down_proj.weight", (*_M, "shared_down"), (shared_f,), (d,))]
    if cfg.shared_expert_gate:
        rules.append(Rule(P + "shared_expert_gate.weight", ((*_M, "shared_expert_gate"),),
                          (1, d), lambda w: (w.reshape(d),), lambda p: p[0].reshape(1, d)))
    return rules


def _llama_style(cfg: Config, family: str) -> list[Rule]:
    attention = _mla(cfg) if cfg.attention == "mla" else _gqa(cfg)
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    experts = _only(moe, _experts(cfg, family)) if moe else []
    return (_outer(cfg) + attention + _only(dense, _mlp(cfg)) + experts
            + _mtp(cfg, family, attention))


def _mtp(cfg: Config, family: str, attention: list[Rule]) -> list[Rule]:
    """DeepSeek-V3's MTP modules, stored as layers n_layers.. (num_nextn_predict_layers of
    them): a whole decoder layer plus enorm, hnorm, eh_proj, shared_head.norm, and copies
    of the shared embedding and LM head."""
    d, v = cfg.d_model, cfg.vocab_size
    ffn = _experts(cfg, family) if cfg.is_moe_layer(cfg.n_layers) else _mlp(cfg)
    layer = [r for r in _outer(cfg) if "{i}" in r.hf] + attention + ffn
    head = (_table("lm_head.weight", ("embed", "embedding"), (v, d)) if cfg.tie_embeddings
            else _linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    rules = []
    for k in range(cfg.mtp_depth):
        at_k = LAYER.format(i=cfg.n_layers + k)
        rules += [dataclasses.replace(r, hf=r.hf.format(i=cfg.n_layers + k), layers=None,
                                      paths=tuple(("mtp", k, "block", *p[2:]) for p in r.paths))
                  for r in layer]
        rules += [_vector(at_k + "enorm.weight", ("mtp", k, "enorm", "scale"), (d,)),
                  _vector(at_k + "hnorm.weight", ("mtp", k, "hnorm", "scale"), (d,)),
                  _linear(at_k + "eh_proj.weight", ("mtp", k, "eh_proj", "kernel"), (2 * d,),
                          (d,)),
                  _vector(at_k + "shared_head.norm.weight", ("mtp", k, "head_norm", "scale"),
                          (d,)),
                  dataclasses.replace(_table(at_k + "embed_tokens.weight", ("embed", "embedding"),
                                             (v, d)), copy=True),
                  dataclasses.replace(head, hf=at_k + "shared_head.head.weight", copy=True)]
    return rules


# GPT-2 ------------------------------------------------------------------------------------
def _gpt2(cfg: Config) -> list[Rule]:
    d, f, v, h, hd = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_heads, cfg.dim_per_head
    L = "transformer.h.{i}."
    rules = [_table("transformer.wte.weight", ("embed", "embedding"), (v, d)),
             _table("transformer.wpe.weight", ("pos_embed",), (cfg.max_position, d)),
             _vector("transformer.ln_f.weight", ("final_norm", "scale"), (d,)),
             _vector("transformer.ln_f.bias", ("final_norm", "bias"), (d,)),
             _fused_qkv(L + "attn.c_attn.weight", "kernel", (d,), h, hd),
             _fused_qkv(L + "attn.c_attn.bias", "bias", (), h, hd),
             _linear(L + "attn.c_proj.weight", (*_A, "o_proj", "kernel"), (h, hd), (d,), True),
             _vector(L + "attn.c_proj.bias", (*_A, "o_proj", "bias"), (d,)),
             _linear(L + "mlp.c_fc.weight", (*_M, "up", "kernel"), (d,), (f,), True),
             _vector(L + "mlp.c_fc.bias", (*_M, "up", "bias"), (f,)),
             _linear(L + "mlp.c_proj.weight", (*_M, "down", "kernel"), (f,), (d,), True),
             _vector(L + "mlp.c_proj.bias", (*_M, "down", "bias"), (d,))]
    for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        rules += [_vector(L + f"{hf_norm}.{w}", (*_B, norm, p), (d,))
                  for w, p in (("weight", "scale"), ("bias", "bias"))]
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    return rules


def rules_for(family: str, cfg: Config) -> list[Rule]:
    """Every tensor of a `family` checkpoint holding cfg, and where it goes."""
    return _gpt2(cfg) if family == "gpt2" else _llama_style(cfg, family)
