"""The engine's forward pass: the model's own pieces, run over per-layer weights.

CausalLM runs its identical blocks with lax.scan over weights stacked on a 'layers' axis,
which is what training wants (compile once). In a decode step that scan costs a copy of
every layer's weights (a dynamic slice of the stack) and of the stacked cache (scan ys)
per token, which roughly halves decode speed on CPU. Here the weights are split once into
per-layer states (jaxlm.model.build.split_layers), the cache is per layer (DecodeCache),
and the layer loop is a Python loop inside jit: every weight is read once per step,
straight from its own buffer.

No maths lives here: embeddings and positions (CausalLM.embed_inputs /
position_signals), each Block, and the final norm + LM head (CausalLM.head) are the
model's own methods, so a change to the model is a change to the engine too (tested
equal for every model kind in tests/test_infer.py).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm.model import sharding
from jaxlm.model.build import split_layers
from jaxlm.model.cache import PageIndex
from jaxlm.model.config import Config
from jaxlm.model.peft import PeftInputs
from jaxlm.model.transformer import CausalLM

from .cache import DecodeCache, cache_sharding


@dataclasses.dataclass(frozen=True)
class LayerGraphs:
    """The static half of a model cut at its layers (hashable: a jit static argument):
    `outer`, the graph of the model without its blocks (embeddings, final norm, head);
    `layers`, one Block graph per layer; the mesh that the weights and the cache
    are sharded over (None: one device); and `keep_quantized` (see loop_weights)."""
    cfg: Config
    outer: Any
    layers: tuple
    mesh: Mesh | None = None
    keep_quantized: bool = False


@partial(jax.tree_util.register_dataclass, data_fields=["outer", "layers"], meta_fields=[])
@dataclasses.dataclass
class LayerWeights:
    """The arrays of the same cut: the outer model's state and one state per layer."""
    outer: Any
    layers: tuple


def split_model(lm: CausalLM, mesh: Mesh | None = None,
                keep_quantized: bool | None = None) -> tuple[LayerGraphs, LayerWeights]:
    """(static graphs, per-layer weights) of lm, laid out over `mesh` by the logical axis
    rules when one is given (tensor-parallel heads/mlp, FSDP embed, experts).
    keep_quantized: for quantized weights, whether decode loops read them quantized in
    every step (loop_weights); None: on every backend but the CPU."""
    if keep_quantized is None:
        keep_quantized = jax.default_backend() != "cpu"
    keep_quantized = bool(keep_quantized and lm.cfg.weight_quant is not None)
    outer_graph, outer_state, layer_graphs, layer_states = split_layers(lm)
    if mesh is not None:
        outer_state = _pad_vocab(outer_state, lm.cfg.vocab_size, mesh)
        outer_state = jax.device_put(outer_state, sharding.state_shardings(outer_state, mesh))
        layer_states = tuple(jax.device_put(st, sharding.state_shardings(st, mesh, drop=1))  # no 'layers'
                             for st in layer_states)
    return (LayerGraphs(lm.cfg, outer_graph, layer_graphs, mesh, keep_quantized),
            LayerWeights(outer_state, layer_states))


def _pad_vocab(state, vocab: int, mesh: Mesh):
    """Every 'vocab' dim (embedding rows, LM-head columns, a LoRA's B on the head) padded
    with zeros to a multiple of the mesh's tensor axis, as vLLM and MaxText pad, so a
    vocabulary that does not divide it (GPT-2's 50257) still splits over it. The padded
    ids are never looked up, and CausalLM.project drops their logits."""
    t = mesh.shape.get("tensor", 1)
    if t == 1 or vocab % t == 0:
        return state
    padded = -(-vocab // t) * t

    def one(var):
        names = var.get_metadata().get("out_sharding") or ()
        dims = [i for i, n in enumerate(names) if n == "vocab" and var.shape[i] == vocab]
        if not dims:
            return var
        widths = [(0, 0)] * len(var.shape)
        widths[dims[0]] = (0, padded - vocab)
        return var.replace(jnp.pad(var[...], widths))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def loop_weights(graphs: LayerGraphs, weights: LayerWeights, counter) -> LayerWeights:
    """The weights as the body of a decode loop (while/fori over steps) reads them.

    A quantized weight is dequantized where a matmul reads it. Inside a loop that
    conversion does not depend on the step, so XLA hoists it out of the loop: the loop
    then reads a float copy of every weight (as much memory as the float model, on top of
    the quantized one). Where the backend fuses the conversion into the matmul (GPU, TPU)
    that throws away the point of quantizing, so with graphs.keep_quantized the weights
    pass an optimization barrier together with the loop counter: the conversion then
    depends on the step and stays beside its matmul. XLA's CPU backend does not fuse it
    (it writes the float weight, then calls its dot: 5-12x a float32 matmul, measured in
    benchmarks/quantize.py), so on CPU the default lets XLA hoist, trading memory during
    a decode call for float32 speed."""
    if not graphs.keep_quantized:
        return weights
    return jax.lax.optimization_barrier((weights, counter))[0]


def replicated(graphs: LayerGraphs, tree):
    """Small outputs every process reads back (tokens, counts, logits) live whole on every
    device of the mesh, so device_get works on each host of a multi-host run."""
    if graphs.mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding.replicated(graphs.mesh))


def outer_model(graphs: LayerGraphs, weights: LayerWeights) -> CausalLM:
    """The model without its blocks: embeddings, final norm, LM head, MTP/Medusa heads."""
    return nnx.merge(graphs.outer, weights.outer)


def forward(graphs: LayerGraphs, weights: LayerWeights, tokens, cache: DecodeCache,
            last=None):
    """tokens [b,t] written at slots cache.lengths.. (positions = slots).

    last: None → logits for every position [b,t,v]; an int array [b] → only the hidden
    state at index last[b] goes through the head, giving [b,1,v] (prefill needs one row's
    last real token, and the head over every padded position would cost more than it).
    Rows of a cache with `peft_ids` run their own stacked adapter in every Block.
    Returns (logits, cache with lengths + t)."""
    h, new_cache = hidden(graphs, weights, tokens, cache, last)
    peft = None if cache.peft_ids is None else PeftInputs(ids=cache.peft_ids)
    return outer_model(graphs, weights).project(h, peft), new_cache


def hidden(graphs: LayerGraphs, weights: LayerWeights, tokens, cache: DecodeCache,
           last=None):
    """As forward, but (final hidden states [b,t,d] (or [b,1,d] with last), cache): what
    the LM head reads, and what Medusa and MTP heads read too."""
    lm = outer_model(graphs, weights)
    t = tokens.shape[1]
    starts = cache.lengths
    peft = None if cache.peft_ids is None else PeftInputs(ids=cache.peft_ids)
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)
    x, new_layers = _blocks(graphs, weights, lm, tokens, positions, cache.layers,
                            cache.slot_axis, starts=starts, peft=peft)
    if last is not None:
        x = jnp.take_along_axis(x, last[:, None, None].astype(jnp.int32), axis=1)
    return lm.final_hidden(x), dataclasses.replace(cache, layers=new_layers,
                                                   lengths=starts + t)


def paged_hidden(graphs: LayerGraphs, weights: LayerWeights, tokens, positions, pools,
                 pages: PageIndex, peft: PeftInputs | None = None):
    """One packed step over a paged cache (infer/scheduler.py): tokens and positions [1,T]
    of several sequences, pools one tuple of page pools per layer, pages where each token
    goes (model.cache.PageIndex); peft: each token's stacked adapter, ids [1,T]. Returns
    (final hidden states [1,T,d], new pools)."""
    lm = outer_model(graphs, weights)
    x, pools = _blocks(graphs, weights, lm, tokens, positions, pools, None, pages=pages,
                       peft=peft)
    return lm.final_hidden(x), pools


def _blocks(graphs, weights, lm, tokens, positions, kvs, slot_axis, **block_kwargs):
    """Embed, then every Block over its own weights and cache buffers: (x, new buffers)."""
    x = lm.embed_inputs(tokens, positions)
    rope, alibi = lm.position_signals(positions)
    new_layers = []
    for i, (graph, state, kv) in enumerate(zip(graphs.layers, weights.layers, kvs)):
        with jax.named_scope(f"layer{i}"):
            block = nnx.merge(graph, state)
            x, kv, _ = block(x, positions, rope=rope, alibi=alibi, kv=kv, **block_kwargs)
        if graphs.mesh is not None and slot_axis is not None:
            # keep the cache where it was created (and donated)
            kv = tuple(jax.lax.with_sharding_constraint(
                buf, cache_sharding(graphs.mesh, buf, slot_axis)) for buf in kv)
        new_layers.append(kv)
    return x, tuple(new_layers)
