"""Mixture-of-experts feed-forward layer: router, routed experts, optional shared expert.

The maths lives in jaxlm.ops.moe; this module holds the parameters and returns the
balance losses beside the output (never in module state):
    y, aux = moe(x)      aux = {load_balance_loss, router_z_loss, dropped_fraction, expert_load}

Traced under a mesh whose 'expert' axis is > 1 (`with jax.set_mesh(mesh)`), the routed
experts run expert-parallel: each device keeps e/ep experts and token-slots travel to
them by all-to-all (ops.moe.moe_expert_parallel); otherwise XLA partitions the chosen
single-program dispatch.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.ops import moe as moe_ops

from .config import Config
from .layers import make_param, residual_std
from .sharding import expert_parallel_size, logical_to_spec


# The weights LoRA may adapt (experts and shared experts).
_ADAPTABLE = ("gate", "up", "down", "shared_gate_proj", "shared_up", "shared_down")


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias: not trained by gradients, moved by
    ops.moe.update_router_bias toward balanced load."""


class MoE(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        e, d = cfg.n_experts, cfg.d_model
        f = cfg.moe_ffn_dim or cfg.ffn_dim
        self.cfg = cfg
        self.router = make_param(rngs, (d, e), ("embed", "expert"), "normal", cfg)
        self.router_bias = (RouterBias(jnp.zeros((e,), jnp.float32), sharding_names=("expert",),
                                       eager_sharding=False)
                            if cfg.router == "sigmoid" else None)
        experts = lambda shape, axes, std=None: make_param(rngs, shape, axes, "normal", cfg, std)  # noqa: E731
        self.gate = experts((e, d, f), ("expert", "embed", "mlp")) if cfg.gated_mlp else None
        self.up = experts((e, d, f), ("expert", "embed", "mlp"))
        self.down = experts((e, f, d), ("expert", "mlp", "embed"), residual_std(cfg))
        shared_f = cfg.shared_ffn_dim or cfg.n_shared_experts * f
        if shared_f:
            dense = lambda shape, axes, std=None: make_param(rngs, shape, axes, "normal", cfg, std)  # noqa: E731
            self.shared_gate_proj = dense((d, shared_f), ("embed", "mlp")) if cfg.gated_mlp else None
            self.shared_up = dense((d, shared_f), ("embed", "mlp"))
            self.shared_down = dense((shared_f, d), ("mlp", "embed"), residual_std(cfg))
        else:
            self.shared_gate_proj = self.shared_up = self.shared_down = None
        self.shared_expert_gate = (make_param(rngs, (d,), ("embed",), "normal", cfg)
                                   if shared_f and cfg.shared_expert_gate else None)
        # LoRA on the expert weights (jaxlm.model.peft): <weight name>_lora, s·A·B added
        # to the weight (per expert), since the experts are weights, not Dense calls.
        for name in _ADAPTABLE:
            setattr(self, f"{name}_lora", nnx.data(None))

    def _weight(self, name: str, dtype):
        p, lora = getattr(self, name), getattr(self, f"{name}_lora", None)
        if p is None:
            return None
        if lora is None:
            return p[...].astype(dtype)
        return (p[...].astype(jnp.float32) + lora.weight_delta(lead=lora.a[...].ndim - 2)
                ).astype(dtype)

    def route(self, x):
        """Routing for flattened tokens x [n,d]."""
        cfg = self.cfg
        logits = moe_ops.router_logits(x, self.router[...])
        if cfg.router == "sigmoid":
            return moe_ops.sigmoid_topk_router(
                logits, cfg.n_experts_per_tok, bias=self.router_bias[...],
                norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                n_group=cfg.n_group, topk_group=cfg.topk_group)
        return moe_ops.softmax_topk_router(
            logits, cfg.n_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)

    def __call__(self, x, peft=None):
        """peft is accepted for a uniform call; expert LoRA needs no per-call inputs (no
        dropout: the delta is added to the weights)."""
        del peft
        cfg = self.cfg
        b, t, d = x.shape
        dtype = x.dtype
        xf = x.reshape(b * t, d)
        routing = self.route(xf)
        w = lambda name: self._weight(name, dtype)  # noqa: E731
        ep = expert_parallel_size()
        if ep > 1 and cfg.moe_dispatch != "dense" and cfg.n_experts % ep == 0:
            y, dropped = self._expert_parallel(xf, b, routing, w("gate"), w("up"), w("down"))
        else:
            y, dropped = moe_ops.routed_experts(
                xf, routing, w("gate"), w("up"), w("down"),
                dispatch=cfg.moe_dispatch, activation=cfg.activation,
                capacity_factor=cfg.capacity_factor)
        if self.shared_up is not None:
            y = moe_ops.add_shared_experts(
                y, xf, w("shared_gate_proj"), w("shared_up"), w("shared_down"),
                activation=cfg.activation, w_shared_gate=w("shared_expert_gate"))
        load = moe_ops.expert_load(routing.experts, cfg.n_experts)
        aux = {"load_balance_loss": moe_ops.load_balance_loss(routing.probs, routing.experts),
               "router_z_loss": moe_ops.router_z_loss(routing.logits),
               "dropped_fraction": dropped,
               "expert_load": load / load.sum()}
        return y.reshape(b, t, d), aux

    def _expert_parallel(self, xf, b, routing, w_gate, w_up, w_down):
        """The routed experts split over the mesh's 'expert' axis (ops.moe_expert_parallel
        under shard_map); tokens stay split over the batch axes as they arrive."""
        cfg = self.cfg
        mesh = jax.sharding.get_abstract_mesh()
        rows = logical_to_spec(("batch",), (b,), mesh)[0]  # the axes splitting the batch
        n_shards = math.prod(mesh.shape[a] for a in
                             ((rows,) if isinstance(rows, str) else rows or ()))
        n_local, k = xf.shape[0] // n_shards, cfg.n_experts_per_tok
        capacity = None  # dropless: room for every slot
        if cfg.moe_dispatch == "capacity":
            ep = mesh.shape["expert"]
            capacity = min(n_local * k, math.ceil(cfg.capacity_factor * n_local * k / ep))
        gated = w_gate is not None

        def local(x, weights, experts, *w):
            routed = moe_ops.Routing(weights, experts, None, None)
            return moe_ops.moe_expert_parallel(
                x, routed, w[0] if gated else None, w[-2], w[-1], axis_name="expert",
                capacity=capacity, activation=cfg.activation)

        tok, experts = P(rows, None), P("expert", None, None)
        weights = (w_gate, w_up, w_down) if gated else (w_up, w_down)
        y, kept = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok) + (experts,) *
                                len(weights), out_specs=(tok, tok), check_vma=False)(
            xf, routing.weights, routing.experts, *weights)
        return y, jnp.mean((~kept).astype(jnp.float32))
