"""Mixture of experts: routers, balance losses and four ways to run the experts.

Shapes: tokens arrive flattened, x [n,d] (n = b·t tokens of model width d); e experts
of FFN hidden width f. Router weight [d,e]; expert weights gate [e,d,f], up [e,d,f],
down [e,f,d] (gate is None for a non-gated act(x·up)·down expert). A router picks k
of the e experts per token and returns a `Routing`: weights [n,k] float32, experts
[n,k] int32, probs [n,e], logits [n,e]. A "token-slot" is one (token, choice) pair;
there are n·k of them.

Routers (maths as transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3):
  softmax_topk_router  softmax over e, top-k, optionally renormalised over the k.
  sigmoid_topk_router  sigmoid scores; a per-expert bias shifts only *which* experts
                       are chosen (auxiliary-loss-free balancing); optional
                       group-limited selection (n_group, topk_group).
Both multiply the gate weights by routed_scaling_factor last.

Dispatches (all give the same output where no token is dropped):
  moe_dense     every expert on every token, mixed by the [n,e] gates: the oracle.
  moe_capacity  Switch/GShard: fixed capacity c per expert, [n,e,c] dispatch and
                combine tensors, token-slots over capacity dropped.
  moe_dropless  token-slots sorted by expert, grouped matmuls (lax.ragged_dot).
  moe_expert_parallel  experts split over a mesh axis (inside shard_map): token-slots
                travel to their expert's device and back by all-to-all.

Router logits, probabilities, gate weights and the final weighted combine are
float32 whatever the activation dtype; expert matmuls run in the weights' dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .activations import get_activation, glu

ROUTERS = ("softmax", "sigmoid")   # softmax_topk_router, sigmoid_topk_router
DISPATCHES = ("dropless", "capacity", "dense")


class Routing(NamedTuple):
    """What a router decided for n tokens over e experts, k choices each."""
    weights: jax.Array  # [n,k] float32 gate weight of each chosen expert
    experts: jax.Array  # [n,k] int32 chosen expert ids, best first (by selection score)
    probs: jax.Array    # [n,e] float32 full routing distribution (rows sum to 1)
    logits: jax.Array   # [n,e] float32 router logits (for the z-loss)


# ----------------------------------------------------------------------------- routers

def router_logits(x, w_router):
    """Router logits [n,e] = x [n,d] · w_router [d,e], computed in float32.

    DeepSeek-V3 (HF) also upcasts before the matmul; Mixtral/Qwen compute logits in
    the activation dtype and upcast for the softmax, so bf16 logits differ slightly.
    """
    if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[0]:
        raise ValueError(f"router_logits expects x [n,d] and w_router [d,e]; got "
                         f"{x.shape} and {w_router.shape}")
    return jnp.einsum("nd,de->ne", x.astype(jnp.float32), w_router.astype(jnp.float32))


def _check_k(k, e):
    if not isinstance(k, int) or not 1 <= k <= e:
        raise ValueError(f"k={k!r} experts per token must be an int in [1, e={e}]")


def group_limited_topk(scores, k: int, *, n_group: int = 1, topk_group: int = 1):
    """Top-k of scores [n,e] restricted to the best `topk_group` of `n_group` groups.

    As DeepSeek-V3: the e experts form n_group contiguous groups; a group's score is
    the sum of its two highest scores; experts outside the chosen groups are masked
    to -inf before the final top-k. n_group == 1 is plain top-k.
    Returns (values [n,k], indices [n,k] int32), best first.
    """
    n, e = scores.shape
    _check_k(k, e)
    if n_group < 1 or e % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts e={e}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group == 1:
        return jax.lax.top_k(scores, k)
    per_group = e // n_group
    if per_group < 2:
        raise ValueError(f"n_group={n_group} leaves {per_group} expert per group; group "
                         f"scores sum each group's top 2, so use n_group <= e/2={e // 2}")
    if k > topk_group * per_group:
        raise ValueError(f"k={k} exceeds the {topk_group * per_group} experts in the "
                         f"topk_group={topk_group} kept groups; raise topk_group")
    grouped = scores.reshape(n, n_group, per_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                  # [n, n_group]
    kept = jax.nn.one_hot(jax.lax.top_k(group_scores, topk_group)[1], n_group,
                          dtype=jnp.bool_).any(-2)                        # [n, n_group]
    masked = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(n, e)
    return jax.lax.top_k(masked, k)


def softmax_topk_router(logits, k: int, *, norm_topk_prob: bool = True,
                        routed_scaling_factor: float = 1.0) -> Routing:
    """Softmax top-k routing (Switch k=1, Mixtral, Qwen2-MoE, Qwen3-MoE).

    probs = softmax(logits); the k largest are the gate weights, divided by their
    sum when norm_topk_prob (Mixtral always; Qwen per config), then multiplied by
    routed_scaling_factor. Gradients reach the logits through the chosen weights.
    """
    logits = logits.astype(jnp.float32)
    _check_k(k, logits.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return Routing(weights * routed_scaling_factor, experts.astype(jnp.int32), probs, logits)


def sigmoid_topk_router(logits, k: int, *, bias=None, norm_topk_prob: bool = True,
                        routed_scaling_factor: float = 1.0, n_group: int = 1,
                        topk_group: int = 1) -> Routing:
    """Sigmoid routing with a selection-only bias (DeepSeek-V3).

    scores = sigmoid(logits). Experts are chosen by group_limited_topk on
    scores + bias (bias [e], DeepSeek's e_score_correction_bias; no gradient), but
    the gate weights are the *unbiased* scores of the chosen experts, divided by
    their sum (+1e-20) when norm_topk_prob, then times routed_scaling_factor.
    probs are the scores normalised over all e experts (DeepSeek-V3's sequence-wise
    balance loss uses the same s_i / Σ_j s_j).
    """
    logits = logits.astype(jnp.float32)
    e = logits.shape[-1]
    scores = jax.nn.sigmoid(logits)
    choice = scores
    if bias is not None:
        if bias.shape != (e,):
            raise ValueError(f"bias must have shape [e]=({e},), got {bias.shape}")
        choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    _, experts = group_limited_topk(choice, k, n_group=n_group, topk_group=topk_group)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    probs = scores / scores.sum(-1, keepdims=True)
    return Routing(weights * routed_scaling_factor, experts.astype(jnp.int32), probs, logits)


def expert_load(experts, n_experts: int, mask=None):
    """Token-slots routed to each expert, float32 [e]; mask [n] drops padding tokens."""
    n, k = experts.shape
    w = None if mask is None else jnp.repeat(mask.astype(jnp.float32), k)
    return jnp.bincount(experts.reshape(-1), weights=w, length=n_experts).astype(jnp.float32)


def update_router_bias(bias, load, rate: float):
    """Auxiliary-loss-free balancing step: bias_i += rate · sign(mean(load) - load_i).

    Overloaded experts lose bias (chosen less), underloaded ones gain it. load [e]
    is counts or fractions (only the sign matters), e.g. expert_load(experts, e)
    summed over the layer's batch. Call outside the gradient: bias is not trained.
    """
    if bias.shape != load.shape:
        raise ValueError(f"bias {bias.shape} and load {load.shape} must both be [e]")
    load = load.astype(jnp.float32)
    return (bias + rate * jnp.sign(load.mean() - load)).astype(bias.dtype)


# ------------------------------------------------------------------------------ losses

def load_balance_loss(probs, experts, mask=None):
    """Switch load-balance loss e · Σ_i f_i · P_i (a scalar, float32).

    f_i: fraction of the n·k token-slots routed to expert i (Σ f = 1, no gradient);
    P_i: mean router probability of expert i over tokens. Exactly 1.0 under uniform
    routing and e when every token goes to one expert with probability 1. With
    k > 1 this is transformers' `load_balancing_loss_func` divided by k: HF divides
    the n·k assignment counts by n tokens (Σ f = k), so its uniform value is k.
    mask [n] (1 = real token) excludes padding, like HF's attention_mask.
    """
    n, e = probs.shape
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    total = m.sum()
    f = expert_load(experts, e, m) / (experts.shape[1] * total)
    p = (probs.astype(jnp.float32) * m[:, None]).sum(0) / total
    return e * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits, mask=None):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)², float32 scalar."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2
    if mask is None:
        return z.mean()
    m = mask.astype(jnp.float32)
    return (z * m).sum() / m.sum()


# --------------------------------------------------------------------------- dispatches

def _check_experts(x, routing, w_gate, w_up, w_down):
    if x.ndim != 2:
        raise ValueError(f"x must be flattened tokens [n,d], got shape {x.shape}; "
                         f"reshape [b,t,d] to [b*t,d]")
    n, d = x.shape
    if w_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"w_up must be [e,d,f] and w_down [e,f,d]; got {w_up.shape}, "
                         f"{w_down.shape}")
    e, _, f = w_up.shape
    if w_up.shape != (e, d, f) or w_down.shape != (e, f, d):
        raise ValueError(f"expert weights disagree with x [n,d]={x.shape}: w_up "
                         f"{w_up.shape} must be [e,d,f], w_down {w_down.shape} [e,f,d]")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} must match w_up {w_up.shape} [e,d,f]; "
                         f"pass w_gate=None for a non-gated expert")
    if routing.experts.ndim != 2 or routing.experts.shape[0] != n:
        raise ValueError(f"routing.experts {routing.experts.shape} must be [n,k] with n={n}")
    if routing.weights.shape != routing.experts.shape:
        raise ValueError(f"routing.weights {routing.weights.shape} must match experts "
                         f"{routing.experts.shape}")
    return e


def _ffn(h_up, h_gate, activation):
    """The expert nonlinearity: act(gate)·up when gated, act(up) otherwise."""
    if h_gate is None:
        return get_activation(activation)(h_up)
    return glu(h_gate, h_up, activation)


def combine_weights(routing: Routing, n_experts: int):
    """Gate weights scattered to [n,e] float32: zero for experts a token did not choose."""
    onehot = jax.nn.one_hot(routing.experts, n_experts, dtype=jnp.float32)  # [n,k,e]
    return jnp.einsum("nke,nk->ne", onehot, routing.weights.astype(jnp.float32))


def moe_dense(x, routing: Routing, w_gate, w_up, w_down, *, activation: str = "silu"):
    """Every expert on every token, mixed by the [n,e] gates. O(n·e) work: the oracle.

    Returns [n,d] in x's dtype.
    """
    e = _check_experts(x, routing, w_gate, w_up, w_down)
    up = jnp.einsum("nd,edf->nef", x, w_up)
    gate = None if w_gate is None else jnp.einsum("nd,edf->nef", x, w_gate)
    y = jnp.einsum("nef,efd->ned", _ffn(up, gate, activation), w_down)
    out = jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine_weights(routing, e))
    return out.astype(x.dtype)


def expert_capacity(n: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor · n · k / e), clipped to [1, n].

    An expert never receives more than n token-slots (a token picks distinct
    experts), so capacity beyond n only wastes memory.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(n, math.ceil(capacity_factor * n * k / n_experts)))


def capacity_dispatch(routing: Routing, n_experts: int, capacity: int):
    """Dispatch and combine tensors [n,e,c] for fixed-capacity expert buffers.

    Priority (Switch/GShard): every token's first choice is placed before any
    token's second choice, and so on; within one choice rank, lower token index
    first. The slot of a token-slot in its expert's buffer is the running count
    (one-hot cumsum) of earlier token-slots sent there; slots >= capacity are dropped.
    Returns (dispatch [n,e,c] float32 0/1, combine [n,e,c] float32 = dispatch ·
    gate weight, dropped_fraction: share of the n·k token-slots dropped).
    """
    n, k = routing.experts.shape
    onehot = jax.nn.one_hot(routing.experts, n_experts, dtype=jnp.int32)     # [n,k,e]
    by_rank = onehot.transpose(1, 0, 2).reshape(k * n, n_experts)            # choice-major
    position = (jnp.cumsum(by_rank, axis=0) - 1) * by_rank                   # [k·n, e]
    position = position.sum(-1).reshape(k, n).T                              # [n,k]
    kept = position < capacity
    # [n,k,c]; a dropped slot's index is out of range, so its one-hot row is all zero
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)
    dispatch = jnp.einsum("nke,nkc->nec", onehot.astype(jnp.float32), slot)
    combine = jnp.einsum("nke,nkc,nk->nec", onehot.astype(jnp.float32), slot,
                         routing.weights.astype(jnp.float32))
    dropped_fraction = 1.0 - kept.astype(jnp.float32).mean()
    return dispatch, combine, dropped_fraction


def moe_capacity(x, routing: Routing, w_gate, w_up, w_down, *, capacity_factor: float = 1.25,
                 activation: str = "silu"):
    """Switch-style fixed-capacity dispatch with token dropping.

    Each expert processes a buffer of c = expert_capacity(n, k, e, capacity_factor)
    slots (see capacity_dispatch for who wins a slot); dropped token-slots add
    nothing (the gate weights of the kept ones are not renormalised); with
    capacity_factor >= e/k nothing can be dropped and the output equals
    moe_dropless. The [n,e,c] tensors cost O(capacity_factor · k · n²) memory, so
    this suits small or sharded token counts. Returns (y [n,d] in x's dtype,
    dropped_fraction).
    """
    e = _check_experts(x, routing, w_gate, w_up, w_down)
    n, k = routing.experts.shape
    c = expert_capacity(n, k, e, capacity_factor)
    dispatch, combine, dropped = capacity_dispatch(routing, e, c)
    xe = jnp.einsum("nec,nd->ecd", dispatch.astype(x.dtype), x)
    up = jnp.einsum("ecd,edf->ecf", xe, w_up)
    gate = None if w_gate is None else jnp.einsum("ecd,edf->ecf", xe, w_gate)
    ye = jnp.einsum("ecf,efd->ecd", _ffn(up, gate, activation), w_down)
    out = jnp.einsum("nec,ecd->nd", combine, ye.astype(jnp.float32))
    return out.astype(x.dtype), dropped


def moe_dropless(x, routing: Routing, w_gate, w_up, w_down, *, activation: str = "silu"):
    """Dropless MoE: sort token-slots by expert, grouped matmuls, unsort, combine.

    The n·k token-slots are stably sorted by expert id, so each expert's rows are
    contiguous; jax.lax.ragged_dot multiplies group i (size from a bincount) by
    expert i's weights. Work is O(n·k), nothing is dropped. Returns [n,d] in x's dtype.
    """
    e = _check_experts(x, routing, w_gate, w_up, w_down)
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)                    # slot s = (token s // k, choice s % k)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = x[order // k]                                    # [n·k, d] grouped by expert
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    gate = None if w_gate is None else jax.lax.ragged_dot(xs, w_gate, group_sizes)
    ys = jax.lax.ragged_dot(_ffn(up, gate, activation), w_down, group_sizes)
    unsorted = ys[jnp.argsort(order)].reshape(n, k, -1)   # inverse permutation: a gather
    out = jnp.einsum("nkd,nk->nd", unsorted.astype(jnp.float32),
                     routing.weights.astype(jnp.float32))
    return out.astype(x.dtype)


def moe_expert_parallel(x, routing: Routing, w_gate, w_up, w_down, *, axis_name: str,
                        capacity: int | None = None, activation: str = "silu"):
    """Expert parallelism: run inside shard_map, one call per device of `axis_name`.

    The e experts are split into ep = axis_size contiguous blocks; this device holds block
    r (w_* [e/ep, ...]) and its own tokens x [n,d] with their routing over all e experts.
    Each token-slot goes to the device owning its expert through one all-to-all into
    fixed [ep, c, d] buffers (c slots per source→destination pair), the local experts run
    as grouped matmuls over what arrived (empty slots sorted last and skipped), a second
    all-to-all brings the results back, and they are combined by gate weight here.

    capacity: c; None → n·k, which can never overflow (dropless, the buffers padded for
    the worst case). A smaller c drops slots past it, in token order per destination.
    Returns (y [n,d] in x's dtype, kept [n,k] bool: slots that were not dropped).
    """
    e_local = _check_experts(x, routing, w_gate, w_up, w_down)
    ep = jax.lax.psum(1, axis_name)
    n, k = routing.experts.shape
    d = x.shape[1]
    c = n * k if capacity is None else capacity
    flat = routing.experts.reshape(-1)                        # slot s = (token s//k, choice)
    dest, local = flat // e_local, flat % e_local
    to = jax.nn.one_hot(dest, ep, dtype=jnp.int32)            # [n·k, ep]
    pos = jnp.sum((jnp.cumsum(to, axis=0) - 1) * to, axis=-1)  # rank among slots to dest
    kept = pos < c
    pos = jnp.where(kept, pos, c)                              # out of range: dropped
    send_x = jnp.zeros((ep, c, d), x.dtype).at[dest, pos].set(x[jnp.arange(n * k) // k],
                                                             mode="drop")
    send_e = jnp.full((ep, c), e_local, jnp.int32).at[dest, pos].set(local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis_name, 0, 0, tiled=True).reshape(ep * c, d)
    recv_e = jax.lax.all_to_all(send_e, axis_name, 0, 0, tiled=True).reshape(ep * c)
    # Empty slots carry expert id e_local: sorted after every real group, and rows past
    # the groups' total come out of ragged_dot as zeros.
    order = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = recv_x[order]
    up = jax.lax.ragged_dot(xs, w_up, sizes)
    gate = None if w_gate is None else jax.lax.ragged_dot(xs, w_gate, sizes)
    ys = jax.lax.ragged_dot(_ffn(up, gate, activation), w_down, sizes)
    ys = ys[jnp.argsort(order)].reshape(ep, c, d)
    back = jax.lax.all_to_all(ys, axis_name, 0, 0, tiled=True)          # [ep, c, d]
    got = back.at[dest, pos].get(mode="fill", fill_value=0).reshape(n, k, d)
    out = jnp.einsum("nkd,nk->nd", got.astype(jnp.float32),
                     routing.weights.astype(jnp.float32) * kept.reshape(n, k))
    return out.astype(x.dtype), kept.reshape(n, k)


def routed_experts(x, routing: Routing, w_gate, w_up, w_down, *, dispatch: str = "dropless",
                   activation: str = "silu", capacity_factor: float = 1.25):
    """Run the routed experts with the named dispatch ("dropless", "capacity", "dense").

    Returns (y [n,d], dropped_fraction); dropped_fraction is 0 except for "capacity".
    """
    if dispatch == "capacity":
        return moe_capacity(x, routing, w_gate, w_up, w_down,
                            capacity_factor=capacity_factor, activation=activation)
    if dispatch == "dropless":
        y = moe_dropless(x, routing, w_gate, w_up, w_down, activation=activation)
    elif dispatch == "dense":
        y = moe_dense(x, routing, w_gate, w_up, w_down, activation=activation)
    else:
        raise ValueError(f"dispatch={dispatch!r}; choose one of {DISPATCHES}")
    return y, jnp.zeros((), jnp.float32)


def add_shared_experts(routed, x, w_gate, w_up, w_down, *, activation: str = "silu",
                       w_shared_gate=None):
    """routed [n,d] + the always-on shared expert MLP of x [n,d].

    Shared weights are one dense MLP: w_gate/w_up [d,f], w_down [f,d] (DeepSeek's
    n_shared_experts are a single MLP of width n_shared · moe_ffn_dim; w_gate None
    for non-gated). w_shared_gate [d] or [d,1] (Qwen2-MoE) scales the shared output
    per token by sigmoid(x · w_shared_gate).
    """
    if w_up.ndim != 2 or w_up.shape[0] != x.shape[-1] or w_down.shape != w_up.shape[::-1]:
        raise ValueError(f"shared expert weights must be w_up [d,f], w_down [f,d] with "
                         f"d={x.shape[-1]}; got {w_up.shape}, {w_down.shape}")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"shared w_gate {w_gate.shape} must match w_up {w_up.shape} [d,f]; "
                         f"pass w_gate=None for a non-gated shared expert")
    up = x @ w_up
    gate = None if w_gate is None else x @ w_gate
    shared = _ffn(up, gate, activation) @ w_down
    if w_shared_gate is not None:
        if w_shared_gate.shape not in ((x.shape[-1],), (x.shape[-1], 1)):
            raise ValueError(f"w_shared_gate must be [d] or [d,1] with d={x.shape[-1]}, "
                             f"got {w_shared_gate.shape}")
        g = jax.nn.sigmoid(x.astype(jnp.float32) @ w_shared_gate.reshape(-1, 1)
                           .astype(jnp.float32))
        shared = shared.astype(jnp.float32) * g
    return (routed.astype(jnp.float32) + shared.astype(jnp.float32)).astype(routed.dtype)
