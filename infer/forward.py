"""The inference forward pass: the model's own Blocks, one per layer, unrolled.

CausalLM runs its identical blocks with lax.scan over weights stacked on a 'layers' axis,
which is what training wants (compile once). In a decode step that scan costs a copy of
every layer's weights (a dynamic slice of the stack) and of the stacked cache (scan ys)
per token, which roughly halves decode speed on CPU. Here the weights are split once into
per-layer states, the cache is per layer (DecodeCache), and the layer loop is a Python
loop inside jit: every weight is read once per step, straight from its own buffer.

The blocks are CausalLM's Block modules merged from per-layer states, so the layer maths
is the model's; only the thin embed/positions/head wrapper of CausalLM.__call__ is
repeated here (and tested equal to it in tests/test_infer.py).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm import ops
from jaxlm.model.config import Config
from jaxlm.model.sharding import state_shardings
from jaxlm.model.transformer import CausalLM

from .cache import DecodeCache, cache_sharding


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static structure (hashable; a jit static argument): the model without its blocks
    ('shell': embeddings, final norm, head), one Block graph per layer, and the mesh the
    weights and cache are sharded over (None: one device)."""
    cfg: Config
    shell: Any
    layers: tuple
    mesh: Mesh | None = None


@partial(jax.tree_util.register_dataclass, data_fields=["shell", "layers"], meta_fields=[])
@dataclasses.dataclass
class Weights:
    shell: Any     # nnx.State of the shell
    layers: tuple  # nnx.State per layer


@partial(jax.jit, static_argnums=0)
def _unstack(n: int, state):
    return tuple(jax.tree.map(lambda x: x[i], state) for i in range(n))


def split_model(lm: CausalLM, mesh: Mesh | None = None) -> tuple[Graphs, Weights]:
    """(static graphs, per-layer weights) of lm. lm itself is left untouched; the block
    weights are copied once into per-layer arrays, laid out over `mesh` by the logical
    axis rules when one is given (tensor-parallel heads/mlp, FSDP embed, experts)."""
    shell = nnx.merge(*nnx.split(lm))  # a second module tree over the same arrays
    groups = list(shell.blocks)
    shell.blocks = nnx.List([])
    shell_graph, shell_state = nnx.split(shell)
    layer_graphs, layer_states = [], []
    for group, (_, n) in zip(groups, lm.cfg.layer_groups()):
        graph, state = nnx.split(group)
        layer_graphs += [graph] * n
        layer_states += list(_unstack(n, state))
    if mesh is not None:
        shell_state = jax.device_put(shell_state, state_shardings(shell_state, mesh))
        layer_states = [jax.device_put(st, state_shardings(st, mesh, drop=1))  # no 'layers'
                        for st in layer_states]
    return (Graphs(lm.cfg, shell_graph, tuple(layer_graphs), mesh),
            Weights(shell_state, tuple(layer_states)))


def _embed(shell: CausalLM, cfg: Config, tokens, positions):
    x = shell.embed(tokens)
    if shell.pos_embed is not None:
        # Padding can sit past the table (it is never attended); keep its lookup finite.
        table = shell.pos_embed[...]
        x = x + jnp.take(table, jnp.minimum(positions, table.shape[0] - 1),
                         axis=0).astype(x.dtype)
    elif cfg.position == "sinusoidal":
        x = x + ops.sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
    return x


def _head(shell: CausalLM, cfg: Config, x):
    x = shell.final_norm(x)
    logits = shell.embed.attend(x) if shell.lm_head is None else shell.lm_head(x)
    logits = logits.astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = ops.soft_cap(logits, cfg.final_softcap)
    return logits


def forward(graphs: Graphs, weights: Weights, tokens, cache: DecodeCache, last=None):
    """tokens [b,t] written at slots cache.lengths.. (positions = slots).

    last: None → logits for every position [b,t,v]; an int array [b] → only the hidden
    state at index last[b] goes through the head, giving [b,1,v] (prefill needs one row's
    last real token, and the head over every padded position would cost more than it).
    Returns (logits, cache with lengths + t)."""
    cfg = graphs.cfg
    shell = nnx.merge(graphs.shell, weights.shell)
    b, t = tokens.shape
    starts = cache.lengths
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)
    x = _embed(shell, cfg, tokens, positions)
    rope, alibi = shell._position_signals(positions)
    new_layers = []
    for graph, state, kv in zip(graphs.layers, weights.layers, cache.layers):
        with jax.named_scope(f"layer{len(new_layers)}"):
            block = nnx.merge(graph, state)
            x, kv, _ = block(x, positions, rope=rope, alibi=alibi, kv=kv, starts=starts)
        if graphs.mesh is not None:  # keep the cache where it was created (and donated)
            kv = tuple(jax.lax.with_sharding_constraint(
                buf, cache_sharding(graphs.mesh, buf, cache.slot_axis)) for buf in kv)
        new_layers.append(kv)
    if last is not None:
        x = jnp.take_along_axis(x, last[:, None, None].astype(jnp.int32), axis=1)
    return _head(shell, cfg, x), DecodeCache(tuple(new_layers), starts + t, cache.slot_axis)
