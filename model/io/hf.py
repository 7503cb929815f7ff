"""Hugging Face checkpoint directories in and out: config.json + safetensors ⇄ CausalLM.

    lm = from_hf("/models/Llama-3.2-1B")     # a local directory; the Hub is never contacted
    to_hf(lm, "/tmp/out")                    # AutoModelForCausalLM.from_pretrained("/tmp/out")

Loading is strict and all-or-nothing: every missing, unexpected, wrongly shaped and
unreadable tensor is collected from the safetensors headers and reported in one ValueError
before any tensor data is read, and the model is only assembled once every tensor converted.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..build import abstract_model
from ..config import DTYPES, Config
from ..sharding import state_shardings
from ..transformer import CausalLM
from . import tensor_files
from .hf_config import config_from_hf, dtype_from_hf, family_of, hf_config_from
from .hf_rules import PREFIX, Path, Rule, at, layer_slots, rules_for

# Non-parameter buffers some exporters keep in the state dict.
_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|h\.\d+\.attn\.(bias|masked_bias))$")
Stored = dict[str, tensor_files.StoredTensor]


def _canonical(tensors: Stored, family: str) -> Stored:
    """Keyed as the *ForCausalLM model spells the names. A base model's checkpoint
    (LlamaModel, GPT2Model) lacks the "model."/"transformer." prefix."""
    prefix = PREFIX.get(family, "model.")
    bare = not any(n.startswith(prefix) for n in tensors)
    return {(prefix + n if bare and n != "lm_head.weight" else n): t for n, t in tensors.items()}


def _check(rules: list[Rule], tensors: Stored, cfg: Config) -> None:
    """One ValueError naming every missing, unexpected, wrongly shaped and unreadable tensor."""
    expected = {n: r.shape for r in rules for _, n in r.instances(cfg)}
    missing = sorted(n for n in expected if n not in tensors)
    present = [(tensors[n], s) for n, s in expected.items() if n in tensors]
    shapes = sorted(f"{t.name}: expected {list(s)}, got {list(t.shape)}"
                    for t, s in present if t.shape != s)
    dtypes = sorted(f"{t.name}: {t.dtype}" for t, _ in present if t.dtype_name is None)
    # a tied checkpoint may still store the head; transformers ignores it too
    ignorable = lambda n: bool(_BUFFERS.search(n)) or (cfg.tie_embeddings and n == "lm_head.weight")
    unexpected = sorted(t.name for n, t in tensors.items()
                        if n not in expected and not ignorable(n))
    problems = [f"{title} ({len(items)}): " + ", ".join(items) for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
        (f"dtype not one of {sorted(tensor_files.READABLE)}", dtypes)) if items]
    if problems:
        raise ValueError("checkpoint does not match its config.json:\n  " + "\n  ".join(problems))


def _convert(rules: list[Rule], tensors: Stored, cfg: Config) -> dict[Path, np.ndarray]:
    """Every Param's full value (layers stacked per scan group), in the param dtype."""
    dtype, slots = jnp.dtype(cfg.param_dtype), layer_slots(cfg)
    sizes = [n for _, n in cfg.layer_groups()]
    out: dict[Path, np.ndarray] = {}
    for rule in rules:
        for i, name in rule.instances(cfg):
            parts = rule.load(tensors[name].read())
            for path, part in zip(rule.paths, parts):
                if rule.copy:
                    if not np.array_equal(out[path], part.astype(dtype)):
                        raise ValueError(f"{name} differs from the tensor it duplicates "
                                         f"({'.'.join(map(str, path))}); jaxlm's MTP modules "
                                         f"share the model's embedding and LM head")
                    continue
                if i is None and not rule.index:
                    out[path] = part.astype(dtype)
                    continue
                if i is None:   # one expert of an MTP layer: a slice of an unstacked Param
                    out.setdefault(path, np.empty(rule.slot_shape, dtype))[rule.index] = part
                    continue
                g, j = slots[i]
                where = at(path, g)
                if where not in out:
                    out[where] = np.empty((sizes[g], *(rule.slot_shape or part.shape)), dtype)
                out[where][(j, *rule.index)] = part
    return out


def _dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    return name


def _read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no config.json; from_hf reads a local Hugging Face "
                         f"model directory (config.json + *.safetensors)")
    with open(file) as fh:
        return json.load(fh)


def from_hf(path: str, dtype=None, param_dtype=None, mesh=None) -> CausalLM:
    """Load a local HF checkpoint directory (config.json + *.safetensors, sharded or not).

    param_dtype defaults to the checkpoint's dtype (config.json `dtype`/`torch_dtype`,
    else the stored embedding's), dtype (compute) to param_dtype. With a mesh, each
    tensor goes from host memory straight into its shards (logical-axis rules).
    """
    hf = _read_config(path)
    family = family_of(hf)
    tensors = _canonical(tensor_files.read_headers(path), family)
    if "tie_word_embeddings" not in hf and "lm_head.weight" not in tensors:
        hf["tie_word_embeddings"] = True  # unstated in config.json and no head stored: tied
    cfg = config_from_hf(hf)
    stored = next((t.dtype_name for n, t in tensors.items() if "embed" in n or "wte" in n),
                  None)
    param_dtype = _dtype_name(param_dtype or dtype_from_hf(hf) or
                              (stored if stored in DTYPES else "float32"))
    cfg = cfg.replace(param_dtype=param_dtype, dtype=_dtype_name(dtype or param_dtype))
    if cfg.mtp_depth and f"model.layers.{cfg.n_layers}.eh_proj.weight" not in tensors:
        # transformers writes num_nextn_predict_layers but never the MTP layers themselves
        cfg = cfg.replace(mtp_depth=0)

    rules = rules_for(family, cfg)
    _check(rules, tensors, cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    # shardings first: a mesh that cannot split some parameter fails before data is read
    shardings = (None if mesh is None else
                 {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, mesh))})
    values = _convert(rules, tensors, cfg)
    params = dict(nnx.to_flat_state(state))
    want, got = ({p: v.shape for p, v in d.items()} for d in (params, values))
    if want != got:  # a bug in the rules, not in the checkpoint
        diff = sorted(str(p) for p in set(want) | set(got) if want.get(p) != got.get(p))
        raise AssertionError(f"jaxlm.model.io.hf_rules are out of date with CausalLM: {diff}")
    for path_, var in params.items():  # assigned only now that everything converted
        value = values.pop(path_)     # host copies freed as they land on the devices
        var.set_value(jnp.asarray(value) if mesh is None
                      else jax.device_put(value, shardings[path_]))
    return nnx.merge(graphdef, state)


def to_hf(lm: CausalLM, path: str, dtype=None) -> None:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads
    with no missing or unexpected weights. dtype defaults to the model's param_dtype."""
    cfg = lm.cfg
    hf = hf_config_from(cfg)
    dtype = _dtype_name(dtype or cfg.param_dtype)
    hf["dtype"] = dtype
    params = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(lm))}
    tensors, slots = {}, layer_slots(cfg)
    for rule in rules_for(hf["model_type"], cfg):
        for i, name in rule.instances(cfg):
            parts = tuple(params[p][rule.index] if i is None else
                          params[at(p, slots[i][0])][(slots[i][1], *rule.index)]
                          for p in rule.paths)
            tensors[name] = rule.save(parts).astype(jnp.dtype(dtype))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    tensor_files.write(tensors, os.path.join(path, "model.safetensors"))
