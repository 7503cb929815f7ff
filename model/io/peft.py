"""Adapters in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

    save_peft(lm, "out/")          # PeftModel.from_pretrained(hf_base, "out/") loads it
    load_peft(lm, "adapter/")      # an adapter PEFT saved, attached to lm in place

LoRA tensors are named `base_model.model.<HF module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r]; jaxlm's factors A [*in, r], B [r, *out] are the same numbers with
the multi-dimensional sides flattened in HF's order (GPT-2's fused c_attn: one A, and B
is q, k, v stacked on its output side). Prefix tuning is `prompt_embeddings` [P,
L·2·kv_heads·head_dim], the table PEFT saves even when it trained through its projection
MLP (token_dim and num_attention_heads count kv heads for grouped-query models, as PEFT
writes them). Bottleneck adapters have no PEFT method: they are written in the same two
files with peft_type "JAXLM_BOTTLENECK", which load_peft reads and PEFT does not.

Loading reads JSON and safetensors only (no code runs), checks every tensor's name and
shape first and reports every problem in one ValueError, then assigns.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from .. import peft
from ..config import Config
from .hf_rules import GROUP, layer_slots
from .tensor_files import write as write_tensors

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
BOTTLENECK = "JAXLM_BOTTLENECK"
# LoraConfig fields whose non-default values jaxlm cannot honour, with the default.
_LORA_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None,
                     "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                     "target_parameters": None, "trainable_token_indices": None,
                     "layer_replication": None, "lora_bias": False, "exclude_modules": None,
                     "use_qalora": False, "use_bdlora": None}


# Where each HF LoRA module lives in jaxlm ------------------------------------------
def _lora_places(lm, spec: peft.LoraSpec):
    """[(HF module name, [(LoRA module, layer index in its stack or None)])] for every
    module the spec adapts; several LoRAs for a fused HF module (c_attn)."""
    cfg: Config = lm.cfg
    slots = layer_slots(cfg)
    out = []
    for site in peft.resolve_targets(cfg, spec.targets):
        if site.expert is not None:
            raise ValueError("PEFT's format has no LoRA for transformers 5's fused MoE "
                             "experts; keep this adapter in jaxlm's own run checkpoint")
        for i in (site.layers if site.layers is not None else (None,)):
            g, j = (None, None) if i is None else slots[i]
            mods = []
            for path in site.paths:
                where = tuple(g if p == GROUP else p for p in path)
                if site.kind == "weight":         # a shared expert's weight on a MoE module
                    mods.append(getattr(peft._module(lm, where[:-1]), f"{where[-1]}_lora"))
                else:
                    mods.append(peft._module(lm, where).lora)
            out.append((site.hf if i is None else site.hf.format(i=i),
                        [(m, j) for m in mods]))
    return out


def _at(var, j):
    value = np.asarray(var[...], np.float32)
    return value if j is None else value[j]


# Saving -------------------------------------------------------------------------------
def save_peft(lm, path: str, base_model_name_or_path: str = "") -> None:
    """Write the adapter attached to lm (jaxlm.model.peft.attach / load_peft / a trained
    run) as PEFT does. Merged LoRAs are written as their factors all the same."""
    spec = getattr(lm, "peft_spec", None)
    if spec is None:
        raise ValueError("this model has no adapter to save; attach one first")
    if isinstance(spec, peft.LoraSpec):
        config, tensors = _save_lora(lm, spec)
    elif isinstance(spec, peft.PrefixSpec):
        config, tensors = _save_prefix(lm, spec)
    else:
        config, tensors = _save_bottleneck(lm, spec)
    config = {"base_model_name_or_path": base_model_name_or_path or None,
              "task_type": "CAUSAL_LM", "inference_mode": True, **config}
    os.makedirs(path, exist_ok=True)
    write_tensors(tensors, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def _save_lora(lm, spec: peft.LoraSpec):
    from .hf_config import hf_config_from
    tensors = {}
    for name, mods in _lora_places(lm, spec):
        first, j = mods[0]
        a = _at(first.a, j)
        r = a.shape[-1]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.reshape(-1, r).T.copy()
        b = np.concatenate([_at(m.b, jj).reshape(r, -1) for m, jj in mods], axis=1)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.T.copy()
    targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    config = {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
              "target_modules": targets, "bias": "none",
              "fan_in_fan_out": hf_config_from(lm.cfg)["model_type"] == "gpt2",
              "init_lora_weights": True, **_LORA_UNSUPPORTED}
    return config, tensors


def _prefix_dims(cfg: Config):
    return cfg.n_layers, cfg.num_kv_heads, cfg.num_kv_heads * cfg.dim_per_head


def _save_prefix(lm, spec: peft.PrefixSpec):
    layers, heads, token_dim = _prefix_dims(lm.cfg)
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": spec.tokens,
              "token_dim": token_dim, "num_layers": layers, "num_attention_heads": heads,
              "num_transformer_submodules": 1, "prefix_projection": False,
              "encoder_hidden_size": spec.hidden or token_dim}
    return config, {"prompt_embeddings": np.asarray(lm.prefix.table(), np.float32)}


def _save_bottleneck(lm, spec: peft.BottleneckSpec):
    tensors = {}
    for i, (g, j) in enumerate(layer_slots(lm.cfg)):
        for where in spec.where:
            ad = getattr(lm.blocks[g], f"{where}_adapter")
            for name in ("down", "down_bias", "up", "up_bias"):
                tensors[f"layers.{i}.{where}_adapter.{name}"] = _at(getattr(ad, name), j)
    config = {"peft_type": BOTTLENECK, "dim": spec.dim, "where": list(spec.where),
              "activation": spec.activation}
    return config, tensors


# Loading ------------------------------------------------------------------------------
def spec_from_peft_config(config: dict) -> peft.Spec:
    """The jaxlm spec of a PEFT adapter_config.json, or one ValueError naming what jaxlm
    does not support."""
    kind = config.get("peft_type")
    if kind == "LORA":
        odd = [f"{k}={config[k]!r}" for k, default in _LORA_UNSUPPORTED.items()
               if config.get(k, default) not in (default, None, {}, [])]
        if config.get("bias", "none") != "none":
            odd.append(f"bias={config['bias']!r}")
        if odd:
            raise ValueError(f"unsupported LoRA settings in {CONFIG_FILE}: {', '.join(odd)} "
                             f"(jaxlm loads plain LoRA: bias 'none', no DoRA, one rank)")
        targets = config.get("target_modules")
        if not targets:
            raise ValueError(f"{CONFIG_FILE} names no target_modules")
        return peft.LoraSpec(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                             targets=targets if isinstance(targets, str) else tuple(targets),
                             dropout=float(config.get("lora_dropout") or 0.0),
                             rslora=bool(config.get("use_rslora", False)))
    if kind == "PREFIX_TUNING":
        return peft.PrefixSpec(tokens=int(config["num_virtual_tokens"]))
    if kind == BOTTLENECK:
        return peft.BottleneckSpec(dim=int(config["dim"]), where=tuple(config["where"]),
                                   activation=config["activation"])
    raise ValueError(f"peft_type {kind!r} is not supported; jaxlm loads LORA, PREFIX_TUNING "
                     f"and its own {BOTTLENECK}")


def read_peft_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; pass a PEFT adapter directory "
                         f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {CONFIG_FILE}; is it a PEFT adapter directory?")
    with open(file) as f:
        return json.load(f)


def load_peft(lm, path: str):
    """Attach the adapter saved in `path` (by PEFT or save_peft) to lm, in place; returns
    lm. lm must be the base it was trained on (shapes are checked)."""
    config = read_peft_config(path)
    spec = spec_from_peft_config(config)
    if isinstance(spec, peft.PrefixSpec):
        _check_prefix_config(lm.cfg, config)
    from safetensors import safe_open
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {WEIGHTS_FILE}")
    with safe_open(file, framework="numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    peft.attach(lm, spec)
    try:
        assign = _plan(lm, spec, stored)
    except ValueError:
        _detach(lm)
        raise
    for var, value in assign:
        var.set_value(jnp.asarray(value, jnp.float32))
    return lm


def _check_prefix_config(cfg: Config, config: dict) -> None:
    layers, heads, token_dim = _prefix_dims(cfg)
    want = {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": heads}
    bad = [f"{k}={config.get(k)} (this model: {v})" for k, v in want.items()
           if config.get(k) != v]
    if config.get("num_transformer_submodules", 1) != 1:
        bad.append("num_transformer_submodules != 1")
    if bad:
        raise ValueError(f"this prefix adapter was made for another model: {', '.join(bad)}")


class _Writes:
    """New values of adapter variables, built as one float32 copy per variable and
    written a slice at a time (layer j of a scanned stack, or the whole of it)."""

    def __init__(self):
        self.values = {}      # id(var) → (var, buffer)

    def put(self, var, j, value) -> None:
        buf = self.values.setdefault(id(var), (var, np.array(var[...], np.float32)))[1]
        if j is None:
            buf[...] = value.reshape(buf.shape)
        else:
            buf[j] = value.reshape(buf.shape[1:])


def _plan(lm, spec, stored: dict) -> list:
    """[(Variable, new full value)] for every adapter weight, or one ValueError listing
    every missing, unexpected and misshaped tensor."""
    expected = {}       # tensor name → (shape, put(value, writes))
    if isinstance(spec, peft.LoraSpec):
        _expect_lora(lm, spec, expected)
    elif isinstance(spec, peft.PrefixSpec):
        emb = lm.prefix.embedding
        expected["prompt_embeddings"] = (emb[...].shape, lambda v, w: w.put(emb, None, v))
    else:
        _expect_bottleneck(lm, spec, expected)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = sorted(f"{k}: expected {list(expected[k][0])}, got {list(stored[k].shape)}"
                    for k in set(expected) & set(stored)
                    if tuple(stored[k].shape) != tuple(expected[k][0]))
    problems = [f"{title} ({len(items)}): " + ", ".join(items[:8]) for title, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                if items]
    if problems:
        raise ValueError("adapter does not match this model: " + "; ".join(problems))
    writes = _Writes()
    for name, (_, put) in expected.items():
        put(np.asarray(stored[name], np.float32), writes)
    return list(writes.values.values())


def _expect_lora(lm, spec, expected: dict) -> None:
    """PEFT's A [r, in] is jaxlm's A [*in, r] flattened and transposed; B [out, r] is
    the B's of the module's jaxlm LoRAs [r, *out], flattened side by side, transposed."""
    for name, mods in _lora_places(lm, spec):
        first, j = mods[0]
        a_shape = _at(first.a, j).shape
        r = a_shape[-1]
        expected[f"{PREFIX}{name}.lora_A.weight"] = (
            (r, int(np.prod(a_shape[:-1]))),
            lambda v, w, a=first.a, j=j: w.put(a, j, v.T))
        widths = [int(np.prod(_at(m.b, jj).shape[1:])) for m, jj in mods]

        def put_b(value, writes, mods=mods, widths=widths):
            starts = np.cumsum([0, *widths])
            for (m, jj), lo, hi in zip(mods, starts, starts[1:]):
                writes.put(m.b, jj, value[lo:hi].T)
        expected[f"{PREFIX}{name}.lora_B.weight"] = ((sum(widths), r), put_b)


def _expect_bottleneck(lm, spec, expected: dict) -> None:
    for i, (g, j) in enumerate(layer_slots(lm.cfg)):
        for where in spec.where:
            ad = getattr(lm.blocks[g], f"{where}_adapter")
            for name in ("down", "down_bias", "up", "up_bias"):
                var = getattr(ad, name)
                expected[f"layers.{i}.{where}_adapter.{name}"] = (
                    var[...].shape[1:], lambda v, w, var=var, j=j: w.put(var, j, v))


def _detach(lm) -> None:
    """Undo a failed load's attach, so lm is the base again."""
    for path, _ in peft.loras(lm):
        owner = peft._module(lm, path[:-1])
        setattr(owner, path[-1], None)
    for block in lm.blocks:
        block.attn_adapter = block.mlp_adapter = None
    lm.prefix = None
    lm.peft_spec = None
