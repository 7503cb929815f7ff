"""Serving adapters (jaxlm.model.peft): the one a model carries, or a list that the rows of
one batch choose among.

    Engine(adapted_lm)                                 # its adapter, in every row
    Engine(adapted_lm, merge=True)                     # its LoRA folded into the weights
    Engine(base, adapters=[lm_a, lm_b, "peft_dir"])    # models, or PEFT directories
    engine.generate(prompts, ..., adapter_ids=[0, 1, -1, None])     # -1 / None: the base

Adapter ids index `adapters`; -1 (or None) is the engine's own model: the base, or the
adapter that `lm` itself carries. Rows choose by data, never by a new program: the LoRA and
bottleneck adapters are stacked on the model (peft.attach_stacked) and each row's index
into that stack travels in the DecodeCache (`peft_ids`) through every jitted prefill and
decode step into every Block. A prefix adapter's keys and values are written into its rows'
cache slots 0..P-1 when the cache is made, and those rows start at length P (positions
P..), exactly as CausalLM.init_cache does. With no adapters, or only prefix adapters, the
cache's peft_ids is None and the steps are the plain model's: no added op.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model import peft as P
from jaxlm.model.cache import heads_to_layout
from jaxlm.model.transformer import CausalLM
from jaxlm.ops.quant import quantize_kv

from .cache import DecodeCache
from .prefix import _copy_into_rows


@dataclasses.dataclass
class Served:
    """What the engine knows of its adapters: `n` that rows may choose (0: no list);
    `model_ids`, each adapter's index in the model's stacked set (−1: it has no stacked
    weights, e.g. a prefix), None when the model has no stacked adapters at all; and
    `prefixes`, adapter id (−1: the engine's own model) → (one row's per-layer (K, V)
    buffers in the cache layout, P virtual tokens)."""
    n: int = 0
    model_ids: np.ndarray | None = None
    prefixes: dict = dataclasses.field(default_factory=dict)

    def virtual_tokens(self, adapter: int) -> int:
        """The slots a row of this adapter starts with (its prefix's P, else 0)."""
        return self.prefixes[adapter][1] if adapter in self.prefixes else 0


def prepare(lm: CausalLM, adapters, merge: bool, dtype, slot_axis: int, where=None,
            stack_all: bool = False):
    """(the model the engine splits and runs, Served). where: the sharding of the prefix
    K/V (replicated over the engine's mesh), None on one device. stack_all: every adapter
    gets a place in the stack, a prefix one too (its place is zero), so the stack's shape
    does not depend on which kinds the list holds (infer/adapter_slots.py)."""
    own = P.adapters_of(lm)
    if any(getattr(m, "stacked", False) for m in own):
        raise ValueError("lm carries stacked adapters; pass the base model and "
                         "adapters=[...] instead")
    if adapters is None:
        if merge:
            if not P.loras(lm):
                raise ValueError("merge=True folds a LoRA adapter into the weights, and this "
                                 "model has no LoRA attached")
            lm = P.merge(_own_variables(lm))
        return lm, Served(prefixes=_prefix_table({-1: lm.prefix}, dtype, slot_axis, where))
    if merge:
        raise ValueError("merge=True serves one adapter; with adapters=[...] rows choose "
                         "theirs, so LoRA stays unmerged")
    if own:
        raise ValueError("Engine(lm, adapters=...) needs the base model with no adapter "
                         "attached; pass the adapted models in `adapters`")
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) \
            or not adapters:
        raise ValueError("adapters must be a non-empty list of adapted models or PEFT "
                         "adapter directories")
    adapted = [_load(lm, a, i) for i, a in enumerate(adapters)]
    for i, m in enumerate(adapted):
        if m.cfg != lm.cfg:
            raise ValueError(f"adapter {i} was made for another Config than this model's; "
                             f"serve adapters of this base model only")
        if not P.adapters_of(m):
            raise ValueError(f"adapter {i} has no adapter attached (attach or load_peft one)")
    weighted = [i for i, m in enumerate(adapted)
                if stack_all or any(not isinstance(x, P.Prefix) for x in P.adapters_of(m))]
    served, model_ids = lm, None
    if weighted:
        served = P.attach_stacked(nnx.merge(*nnx.split(lm)), [adapted[i] for i in weighted])
        model_ids = np.full(len(adapted), -1, np.int32)
        model_ids[weighted] = np.arange(len(weighted), dtype=np.int32)
    prefixes = _prefix_table(dict(enumerate(m.prefix for m in adapted)), dtype, slot_axis,
                             where)
    return served, Served(len(adapted), model_ids, prefixes)


def _own_variables(lm: CausalLM) -> CausalLM:
    """lm over new Variables holding the same arrays: merging LoRA into it writes new
    kernels there and leaves lm (and every model sharing its Variables) as it was."""
    graph, state = nnx.split(lm)
    return nnx.merge(graph, jax.tree.map(lambda x: x, state))


def _load(lm: CausalLM, adapter, i: int) -> CausalLM:
    if isinstance(adapter, (str, os.PathLike)):
        from jaxlm.model.io.peft import load_peft
        try:
            return load_peft(nnx.merge(*nnx.split(lm)), os.fspath(adapter))  # lm stays bare
        except ValueError as e:
            raise ValueError(f"adapter {i}: {e}") from None
    if not isinstance(adapter, CausalLM):
        raise ValueError(f"adapter {i} is a {type(adapter).__name__}; pass a CausalLM with "
                         f"one adapter attached, or a PEFT directory")
    return adapter


def _prefix_table(prefixes: dict, dtype, slot_axis: int, where=None) -> dict:
    int8 = jnp.dtype(dtype) == jnp.int8   # an int8 cache holds the prefix quantized
    table = {}
    for adapter, prefix in prefixes.items():
        if prefix is None:
            continue
        kv = jax.device_put(prefix.kv(jnp.float32 if int8 else dtype), where)  # [l,2,P,kh,hd]
        layers = []                                              # per layer, one row's K, V
        for i in range(kv.shape[0]):
            k, v = (heads_to_layout(kv[i, j][None], slot_axis) for j in (0, 1))
            if int8:
                (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
                layers.append((k, v, k_scale, v_scale))
            else:
                layers.append((k, v))
        table[adapter] = (tuple(layers), kv.shape[2])
    return table


def row_adapters(served: Served, adapter_ids, batch: int) -> list[int]:
    """Each row's adapter id (−1: the engine's own model), checked."""
    if adapter_ids is None:
        return [-1] * batch
    if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids,
                                                               (Sequence, np.ndarray)):
        raise ValueError(f"adapter_ids must be a list of ints (one per prompt), got "
                         f"{adapter_ids!r}")
    rows = []
    for a in adapter_ids:
        if a is not None and not isinstance(a, (int, np.integer)):
            raise ValueError(f"adapter_ids must be ints or None, got {a!r}")
        rows.append(-1 if a is None else int(a))
    if len(rows) != batch:
        raise ValueError(f"adapter_ids has {len(rows)} entries for {batch} prompts; give "
                         f"one per prompt (-1 or None: the base model)")
    bad = [a for a in rows if not -1 <= a < served.n]
    if bad:
        what = (f"the engine serves {served.n} adapters (ids 0..{served.n - 1})" if served.n
                else "the engine has no adapter list (Engine(lm, adapters=[...]))")
        raise ValueError(f"adapter_ids {bad[:5]} are out of range: {what}; -1 or None "
                         f"is the base model")
    return rows


def with_adapters(cache: DecodeCache, served: Served, rows: list[int],
                  device=None) -> DecodeCache:
    """A fresh cache with each row's stacked-adapter index and its prefix's K/V."""
    if served.model_ids is not None:
        ids = np.where(np.asarray(rows) >= 0, served.model_ids[np.asarray(rows)], -1)
        cache = dataclasses.replace(cache, peft_ids=jnp.asarray(ids, jnp.int32,
                                                                device=device))
    for adapter, (layers, p) in served.prefixes.items():
        mask = np.asarray([r == adapter for r in rows])
        if not mask.any():
            continue
        if p >= cache.max_len:
            raise ValueError(f"the cache ({cache.max_len} slots) must hold the adapter's "
                             f"prefix of {p} virtual tokens and more")
        cache = _copy_into_rows(cache, layers, jnp.asarray(mask), jnp.int32(p))
    return cache
