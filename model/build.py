"""Making a CausalLM, in one place: shapes only, initialised (optionally born sharded),
split into a static graph + arrays and merged back.

    lm = create(cfg, seed=0)                    # initialised (one jitted program)
    lm = create(cfg, seed=0, mesh=mesh)         # every variable born in its shards
    shapes = abstract_model(cfg)                # no arrays: shapes, dtypes, metadata
    split = SplitModel(lm)                      # graph + parameter dict (what optax and
    lm2 = split.merge(params)                   #   orbax hold), merged back in a jit

Everything else (the trainer, the engine, checkpoint and HF loading, benchmarks) goes
through these, so a change to how the model is built or split is made once.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .config import Config
from .sharding import DEFAULT_RULES, state_shardings
from .transformer import CausalLM


def abstract_model(cfg: Config) -> CausalLM:
    """A CausalLM of ShapeDtypeStructs: structure and metadata, no memory, no compute."""
    return nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))


def abstract_params(cfg: Config):
    """The parameters' shapes as the plain nested dict SplitModel.params has."""
    return nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()


@functools.lru_cache(maxsize=8)
def initializer(cfg: Config, mesh: Mesh | None = None, rules=None):
    """jit(seed -> the full NNX state of a fresh CausalLM(cfg)), every variable created
    directly in its shards when a mesh is given; one compile per (cfg, mesh), any seed."""
    def init(seed):
        return nnx.state(CausalLM(cfg, nnx.Rngs(jax.random.key(seed))))
    if mesh is None:
        return jax.jit(init)
    abstract = nnx.state(abstract_model(cfg))
    return jax.jit(init, out_shardings=state_shardings(abstract, mesh, rules or DEFAULT_RULES))


def create(cfg: Config, seed: int = 0, mesh: Mesh | None = None) -> CausalLM:
    """A freshly initialised CausalLM. Initialisation runs as one jitted program (a
    persistent compilation cache keeps it across runs) rather than op by op. Compute
    dtype, remat and kernel choice never change the parameters, so they share it."""
    init = initializer(cfg.replace(dtype="float32", remat="none", attention_impl="xla"), mesh)
    return nnx.merge(nnx.graphdef(abstract_model(cfg)), init(np.int32(seed)))


def param_shardings(cfg: Config, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of the parameters, as a plain nested dict (SplitModel.params)."""
    return state_shardings(nnx.state(abstract_model(cfg), nnx.Param), mesh, rules).to_pure_dict()


def non_param_shardings(cfg: Config, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of the other variables (router biases), as a plain nested dict."""
    rest = nnx.split(abstract_model(cfg), nnx.Param, ...)[2]
    return state_shardings(rest, mesh, rules).to_pure_dict()


def initial_non_params(cfg: Config):
    """The variables that are not Params (a MoE router's selection bias) at their initial
    values. Jitted, so the unused parameter initialisation is dead code and never runs."""
    return jax.jit(lambda: nnx.split(CausalLM(cfg, nnx.Rngs(0)), nnx.Param, ...)[2])()


def with_heads(base: CausalLM, mtp_depth: int, medusa_heads: int, seed: int = 0) -> CausalLM:
    """base with MTP modules / Medusa heads added (or removed) to these counts: the base's
    weights as they are, new heads freshly initialised (Medusa LM heads as copies of the
    base's head). base itself is returned when nothing changes."""
    cfg = base.cfg.replace(mtp_depth=mtp_depth, medusa_heads=medusa_heads)
    if cfg == base.cfg:
        return base
    from .heads import init_medusa_from_head
    lm = create(cfg, seed)
    shared = {p: v for p, v in nnx.to_flat_state(nnx.state(base))
              if p[0] not in ("mtp", "medusa") or
              (p[0] == "mtp" and p[1] < mtp_depth) or (p[0] == "medusa" and p[1] < medusa_heads)}
    nnx.update(lm, nnx.from_flat_state(shared))
    init_medusa_from_head(lm, range(base.cfg.medusa_heads, medusa_heads))
    return lm


class SplitModel:
    """A CausalLM as a static graph, its parameters as a plain nested dict (what the
    optimizer, gradients and checkpoints hold) and its other variables (`rest`: router
    selection biases, moved by a rule rather than by gradients). `merge` rebuilds the
    module from any arrays of those shapes, inside traced functions too.

    trainable: which Params are `params` (default all). Fine-tuning adapters passes
    jaxlm.model.peft.Adapter: `params` is then the adapter weights alone and the base
    Params are `frozen` (an nnx.State), passed to `merge` as an argument (a jit input,
    never a traced-in constant) and never given to the optimizer. `merge(...,
    adapters=False)` then builds the base alone over the same arrays (the adapters switched
    off in the graph, jaxlm.model.peft.set_enabled): DPO's reference with no second copy."""

    def __init__(self, lm: CausalLM, trainable=nnx.Param):
        self.cfg = lm.cfg
        self.graphdef_off = None
        if trainable is nnx.Param:
            self.graphdef, state, self.rest = nnx.split(lm, nnx.Param, ...)
            self.frozen = None
        else:
            from .peft import set_enabled
            self.graphdef, state, self.frozen, self.rest = nnx.split(lm, trainable,
                                                                     nnx.Param, ...)
            self.graphdef_off = nnx.split(set_enabled(lm, False), trainable, nnx.Param,
                                          ...)[0]
            set_enabled(lm, True)
        self._template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        self.params = state.to_pure_dict()
        # LoRA dropout needs a key per step (jaxlm.model.peft.LoRA.dropout)
        self.uses_dropout = any(getattr(m, "dropout", 0) for _, m in nnx.iter_modules(lm))

    @classmethod
    def create(cls, cfg: Config, seed: int = 0, mesh: Mesh | None = None) -> "SplitModel":
        return cls(create(cfg, seed, mesh))

    def merge(self, params, rest=None, frozen=None, adapters: bool = True) -> CausalLM:
        """The module over `params` (and `rest` / `frozen`, default the split-time values);
        adapters=False: the base alone (an adapter run only)."""
        state = jax.tree.map(lambda x: x, self._template)
        nnx.replace_by_pure_dict(state, params)
        rest = self.rest if rest is None else rest
        if self.frozen is None:
            if not adapters:
                raise ValueError("adapters=False needs a model split with "
                                 "trainable=Adapter (an adapter run)")
            return nnx.merge(self.graphdef, state, rest)
        graph = self.graphdef if adapters else self.graphdef_off
        return nnx.merge(graph, state, self.frozen if frozen is None else frozen, rest)


def split_layers(lm: CausalLM):
    """The model cut at its layers, for a per-layer loop over unstacked weights:
    (outer graph, outer state, one Block graph per layer, one Block state per layer).
    The outer part is the model without its blocks (embeddings, final norm, head), so
    `nnx.merge(outer graph, outer state)` still has embed_inputs/position_signals/head.
    lm is left untouched; the block weights are copied once into per-layer arrays."""
    outer = nnx.merge(*nnx.split(lm))  # a second module tree over the same arrays
    groups = list(outer.blocks)
    outer.blocks = nnx.List([])
    outer_graph, outer_state = nnx.split(outer)
    layer_graphs, layer_states = [], []
    for group, (_, n) in zip(groups, lm.cfg.layer_groups()):
        graph, state = nnx.split(group)
        layer_graphs += [graph] * n
        layer_states += list(_unstack(n, state))
    return outer_graph, outer_state, tuple(layer_graphs), tuple(layer_states)


@functools.partial(jax.jit, static_argnums=0)
def _unstack(n: int, state):
    return tuple(jax.tree.map(lambda x: x[i], state) for i in range(n))
