"""Train state, optimizer and the one jitted step `(state, batch) -> (state, metrics)`.

The state is a plain pytree: fp32 master parameters (a nested dict, the same tree
`jaxlm.model.io.runs.params_of` gives), the model's other variables (`rest`: a
sigmoid router's selection biases), the optax state, the step count and the dynamic
loss scale. The model computes in Config.dtype (bf16/fp16 casts happen inside its
layers), so mixed precision needs nothing here beyond keeping param_dtype float32 and,
for fp16, scaling the loss.

Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer update every MoE
layer's router bias moves by ±router_bias_rate toward equal expert load, measured on
that step's tokens (all micro-batches). The forward pass always reads the state's bias.

A batch holds arrays shaped [accum, b, t]: `inputs`, `targets`, `positions`,
`segment_ids` and `loss_mask`. Micro-batches are summed with lax.scan, so one call
is one optimizer update whatever the accumulation.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from jaxlm.model import Config
from jaxlm.model import build, context, sharding
from jaxlm.model.build import SplitModel
from jaxlm.model.peft import PeftInputs
from jaxlm.ops.moe import update_router_bias

from .config import TrainConfig

# Dynamic loss scaling (fp16): start high, halve on overflow, double after a run of
# finite steps. The same constants as torch.amp.GradScaler.
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 15, 2000
# The model's aux entry holding each MoE layer's expert load [MoE layers, e].
LOAD = "expert_load_per_layer"


class TrainState(struct.PyTreeNode):
    step: jax.Array          # int32 scalar: optimizer updates done
    params: Any              # nested dict of fp32 arrays (params_of layout)
    rest: Any                # SplitModel.rest as a nested dict: router biases; {} if none
    opt_state: Any           # optax state
    loss_scale: jax.Array    # float32 scalar; 1 when loss scaling is off
    good_steps: jax.Array    # int32: finite steps since the scale last changed


def count_params(params, exclude_embeddings: bool = False) -> int:
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if exclude_embeddings and _leaf_name(path) in ("embedding", "pos_embed"):
            continue
        total += x.size
    return total


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params, decay_embeddings: bool):
    """True where weight decay applies: matrices, not norm scales or biases (and not
    embeddings unless asked). Decided by name, since a stacked norm scale is 2-D."""
    def decays(path, _):
        name = _leaf_name(path)
        if name in ("scale", "bias"):
            return False
        if name in ("embedding", "pos_embed"):
            return decay_embeddings
        return True
    return jax.tree_util.tree_map_with_path(decays, params)


def schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to lr (the first update already moves: lr/warmup), then a cosine
    down to lr × min_lr_ratio at the last step."""
    warmup = min(tcfg.warmup_steps, tcfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=tcfg.lr / max(warmup, 1), peak_value=tcfg.lr, warmup_steps=warmup,
        decay_steps=max(tcfg.steps, warmup + 1), end_value=tcfg.lr * tcfg.min_lr_ratio)


def make_optimizer(tcfg: TrainConfig, params) -> optax.GradientTransformation:
    # Clipping is always in the chain (inf = off) so the state tree never depends on it.
    clip = tcfg.clip_norm if tcfg.clip_norm > 0 else float("inf")
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule(tcfg), b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps,
                    weight_decay=tcfg.weight_decay,
                    mask=decay_mask(params, tcfg.decay_embeddings)))


def uses_loss_scale(tcfg: TrainConfig, cfg: Config) -> bool:
    return tcfg.loss_scale == "dynamic" or (tcfg.loss_scale == "auto" and cfg.dtype == "float16")


def init_state(tcfg: TrainConfig, cfg: Config, params, optimizer,
               mesh: Mesh | None = None, rest=None) -> TrainState:
    """The step-0 state. rest: SplitModel.rest as a pure dict (default: the initial
    values). With a mesh the optimizer state is created in the shards of the parameters
    it mirrors (Adam's moments), scalars replicated."""
    if rest is None:
        rest = build.initial_non_params(cfg).to_pure_dict()

    def make(params, rest):
        scale = INIT_SCALE if uses_loss_scale(tcfg, cfg) else 1.0
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=optimizer.init(params),
                          loss_scale=jnp.asarray(scale, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32))
    if mesh is None:
        return make(params, rest)
    return jax.jit(make, out_shardings=state_shardings(tcfg, cfg, optimizer, mesh))(params, rest)


def state_shardings(tcfg: TrainConfig, cfg: Config, optimizer, mesh: Mesh) -> TrainState:
    """Where every TrainState array lives: parameters and router biases by the
    logical-axis rules, the optimizer's parameter-shaped state like its parameter,
    everything else replicated."""
    params = build.param_shardings(cfg, mesh)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s,
                                jax.eval_shape(optimizer.init, build.abstract_params(cfg)), params,
                                transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params, rest=build.non_param_shardings(cfg, mesh), opt_state=opt,
                      loss_scale=rep, good_steps=rep)


def update_router_biases(cfg: Config, rest, load, rate: float):
    """rest with each MoE layer's router bias moved by ops.moe.update_router_bias.
    load [MoE layers, e]: the step's expert load in layer order (the model's aux
    "expert_load_per_layer"); a scanned group of n MoE layers holds biases [n, e]."""
    if not rate or load is None or cfg.router != "sigmoid":
        return rest
    update = jax.vmap(update_router_bias, in_axes=(0, 0, None))
    blocks, first = dict(rest["blocks"]), 0
    for g, (kind, n) in enumerate(cfg.layer_groups()):
        if kind.moe:
            mlp = blocks[g]["mlp"]
            bias = update(mlp["router_bias"], load[first:first + n], rate)
            blocks[g] = {**blocks[g], "mlp": {**mlp, "router_bias": bias}}
            first += n
    return {**rest, "blocks": blocks}


# Loss --------------------------------------------------------------------------------
def token_losses(logits, targets):
    """(cross-entropy [b,t], logsumexp [b,t]) from float32 logits [b,t,v]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, lse


def aux_loss(aux: dict, tcfg: TrainConfig):
    """Σ weight·aux[k] over the model's aux entries whose key ends in "_loss"."""
    per_key = tcfg.aux_weights()
    total = jnp.zeros((), jnp.float32)
    for key, value in aux.items():
        if key.endswith("_loss"):
            total = total + per_key.get(key, tcfg.aux_loss_weight) * jnp.mean(value)
    return total


def _ahead(x, k: int):
    """x [..., t] shifted k positions left along time, zero-filled: x[..., i + k]."""
    return jnp.pad(x[..., k:], [(0, 0)] * (x.ndim - 1) + [(0, k)])


def ahead_mask(batch, k: int):
    """[..., t] float: 1 where the target k positions further on exists, is in the same
    packed document and is trained on (an extra head's target never crosses a segment)."""
    same = _ahead(batch["segment_ids"], k) == batch["segment_ids"]
    return (same & (_ahead(batch["loss_mask"], k) > 0)).astype(jnp.float32)


def head_counts(cfg: Config, batch):
    """[1 + max(D, K)] token counts of the step: the next-token loss's (index 0) and each
    extra head's offset k (index k), each at least 1."""
    counts = [jnp.sum(batch["loss_mask"].astype(jnp.float32))]
    counts += [jnp.sum(ahead_mask(batch, k)) for k in range(1, max(cfg.mtp_depth,
                                                                     cfg.medusa_heads) + 1)]
    return jnp.maximum(jnp.stack(counts), 1.0)


def head_losses(tcfg: TrainConfig, mtp, medusa, mb, counts):
    """(loss, parts) of the extra heads on one micro-batch, each head's masked token sum
    over its step count. MTP (DeepSeek-V3 eq. 25): λ/D Σ_k CE_k. Medusa-1 (Cai et al.
    eq. 1): Σ_k 0.8^k CE_k (decay = --medusa_decay). mtp/medusa: [D or K, b, t, v]."""
    total, parts = jnp.zeros((), jnp.float32), {}
    for name, logits in (("mtp", mtp), ("medusa", medusa)):
        if logits is None:
            continue
        n = logits.shape[0]
        for j in range(n):
            k = j + 1   # head j predicts the target k positions further on
            ce, _ = token_losses(logits[j], _ahead(mb["targets"], k))
            ce_k = jnp.sum(ce * ahead_mask(mb, k)) / counts[k]
            weight = tcfg.mtp_weight / n if name == "mtp" else tcfg.medusa_decay ** k
            total = total + weight * ce_k
            parts[f"{name}_ce/{k}"] = ce_k
    return total, parts


def micro_loss(model: SplitModel, tcfg: TrainConfig, params, mb, n_tokens, n_micro,
               rest=None, frozen=None, key=None):
    """This micro-batch's share of the step loss: token sums are divided by the step's
    total token count, so summing micro-batches equals one big batch exactly. Expert
    loads are divided by the micro-batch count, so the sum is the step's mean load.
    n_tokens: head_counts of the step; frozen: the base weights of an adapter or
    heads-only run; key: LoRA dropout's key (None: none)."""
    lm = model.merge(params, rest, frozen)
    peft = None if key is None else PeftInputs(key=key)
    mtp = medusa = None
    if model.cfg.mtp_depth or model.cfg.medusa_heads:
        logits, aux, mtp, medusa = lm.with_heads(
            mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"], peft=peft)
    else:
        logits, _, aux = lm(mb["inputs"], positions=mb["positions"],
                            segment_ids=mb["segment_ids"], peft=peft)
    mask = mb["loss_mask"].astype(jnp.float32)
    ce, lse = token_losses(logits, mb["targets"])
    ce_sum = jnp.sum(ce * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask)
    aux_total = aux_loss(aux, tcfg) / n_micro
    heads, head_parts = head_losses(tcfg, mtp, medusa, mb, n_tokens)
    n_tokens = n_tokens[0]
    loss = (ce_sum + tcfg.z_loss * z_sum) / n_tokens + aux_total + heads
    parts = {"ce": ce_sum / n_tokens, "z_loss": z_sum / n_tokens, "aux_loss": aux_total,
             **head_parts}
    # expert_load is a distribution (its mean is 1/e): reported through load_imbalance
    parts.update({f"aux/{k}": jnp.mean(v) / n_micro for k, v in aux.items()
                  if k not in (LOAD, "expert_load")})
    if LOAD in aux:
        parts[LOAD] = aux[LOAD] / n_micro
    return loss, parts


class Objective:
    """What a train step minimises, in two parts a loss for another task replaces:
    `counts(cfg, batch)`, the step's normalisers over the whole [accum, ...] batch (so
    micro-batches of any size add up to one big batch), and `micro_loss(...)`, one
    micro-batch's share of the loss and its metrics. `inputs` is passed to micro_loss as
    `extra`, a jit argument (e.g. DPO's frozen reference weights). This one is next-token
    cross-entropy with the model's extra heads: pretraining and SFT (whose loss mask
    keeps only the answers' tokens)."""
    inputs = None

    def counts(self, cfg: Config, batch):
        return head_counts(cfg, batch)

    def micro_loss(self, model, tcfg, params, mb, counts, n_micro, rest, frozen, key, extra):
        return micro_loss(model, tcfg, params, mb, counts, n_micro, rest, frozen, key)


NEXT_TOKEN = Objective()


def loss_and_grads(model: SplitModel, tcfg: TrainConfig, params, batch, scale=1.0, rest=None,
                   frozen=None, key=None, objective: Objective = NEXT_TOKEN, extra=None):
    """(loss, grads, parts) of a whole [accum, b, t] batch; grads of loss × scale. rest:
    the non-Param variables to run with (default: the model's split-time values); frozen:
    an adapter run's base weights (gradients never reach them); key: LoRA dropout's key
    (each micro-batch folds in its index); objective/extra: the loss (default next-token)
    and its jit inputs."""
    n_micro = batch["inputs"].shape[0]
    counts = objective.counts(model.cfg, batch)
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(n_micro))

    def one(mb, k):
        def f(p):
            loss, parts = objective.micro_loss(model, tcfg, p, mb, counts, n_micro, rest,
                                               frozen, k, extra)
            return loss * scale, (loss, parts)
        (_, (loss, parts)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, grads, parts

    first = jax.tree.map(lambda x: x[0], (batch, keys))
    if n_micro == 1:
        return one(*first)

    def body(carry, xs):
        loss, grads, parts = one(*xs)
        return jax.tree.map(jnp.add, carry, (loss, grads, parts)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, *first))
    (loss, grads, parts), _ = jax.lax.scan(body, zero, (batch, keys))
    return loss, grads, parts


def moe_metrics(load, rest) -> dict:
    """The step's expert loads [MoE layers, e]; load_imbalance, the busiest expert's load
    over an even share in the worst layer (1 = balanced); router_bias_max, max |bias|."""
    out = {}
    if load is not None:
        out[LOAD] = load
        out["load_imbalance"] = jnp.max(load) / jnp.mean(load)  # each row sums to 1
    # rest also holds a quantized base's integer weights (QLoRA): read the biases only
    biases = [b for path, b in jax.tree_util.tree_flatten_with_path(rest)[0]
              if "router_bias" in jax.tree_util.keystr(path)]
    if biases:
        out["router_bias_max"] = jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b in biases]))
    return out


def make_train_step(model: SplitModel, tcfg: TrainConfig, optimizer, mesh: Mesh | None = None,
                    objective: Objective = NEXT_TOKEN):
    """The jitted pure function (state, batch) -> (state, metrics); the state is donated.
    objective: the loss (default next-token cross-entropy; DPO's in train/preference.py).

    With a mesh: jax.jit with the state's shardings as outputs (inputs come sharded), the
    host batch [accum, b, t] laid out over the mesh by rows, metrics replicated, and the
    mesh in context while tracing (MoE layers then run expert-parallel)."""
    dynamic = uses_loss_scale(tcfg, model.cfg)
    lr_at = schedule(tcfg)
    dropout = model.uses_dropout

    def step(state: TrainState, batch, frozen, extra) -> tuple[TrainState, dict]:
        scale = state.loss_scale if dynamic else jnp.float32(1.0)
        # LoRA dropout: a key from (seed, step) alone, so a resumed run draws the same masks
        key = (jax.random.fold_in(jax.random.key(tcfg.seed), state.step) if dropout
               else None)
        loss, grads, parts = loss_and_grads(model, tcfg, state.params, batch, scale,
                                            state.rest, frozen, key, objective, extra)
        load = parts.pop(LOAD, None)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = update_router_biases(model.cfg, state.rest, load, tcfg.router_bias_rate)
        new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        skipped = jnp.zeros((), jnp.bool_)
        if dynamic:  # overflowed: a skipped step changes nothing but the scale
            finite = jnp.isfinite(grad_norm)
            skipped = ~finite
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa
            grow = finite & (state.good_steps + 1 >= GROWTH_INTERVAL)
            new = new.replace(
                params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                rest=keep(rest, state.rest),
                loss_scale=jnp.where(finite, jnp.where(grow, scale * 2, scale),
                                     jnp.maximum(scale / 2, 1.0)),
                good_steps=jnp.where(finite & ~grow, state.good_steps + 1, 0))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state.step),
                   "loss_scale": new.loss_scale, "skipped": skipped, **parts,
                   **moe_metrics(load, new.rest)}
        return new, metrics

    if mesh is None:
        return _with_frozen(jax.jit(step, donate_argnums=0), model, objective.inputs)
    shardings = (state_shardings(tcfg, model.cfg, optimizer, mesh), sharding.replicated(mesh))
    return _on_mesh(jax.jit(step, donate_argnums=0, out_shardings=shardings), mesh, 1, model,
                    objective.inputs, order=tcfg.sequence_order)


def _with_frozen(jitted, model: SplitModel, *extra):
    """jitted(first, batch, frozen, *extra) as run(first, batch): an adapter run's base
    weights (and an objective's inputs) go in as arguments every call (never traced in
    as constants, never donated)."""
    def run(first, batch):
        return jitted(first, batch, model.frozen, *extra)
    run.jitted = jitted
    return run


def _on_mesh(jitted, mesh: Mesh, batch_dim: int, model: SplitModel, *extra,
             order: str = "zigzag"):
    """jitted(first, batch, frozen, *extra) run under the mesh, with the host batch made
    global. With a 'sequence' axis the tokens of every row are laid out in `order`
    (context.zigzag_order) and split along it: the loss sums over tokens and attention
    masks by the positions that travel with them, so the order changes no result."""
    n = context.sequence_size(mesh)
    length_dim = batch_dim + 1 if n > 1 else None

    def run(first, batch):
        if length_dim is not None:
            batch = sequence_layout(batch, n, length_dim, order)
        with jax.set_mesh(mesh):
            return jitted(first, sharding.global_batch(batch, mesh, batch_dim,
                                                       length_dim=length_dim),
                          model.frozen, *extra)
    run.jitted = jitted  # for lowering/inspection (under jax.set_mesh, on a global batch)
    return run


def sequence_layout(batch, n: int, length_dim: int, order: str = "zigzag"):
    """Host arrays with every row's positions reordered along length_dim for n devices."""
    def one(x):
        x = np.asarray(x)
        return np.take(x, context.zigzag_order(x.shape[length_dim], n, order), axis=length_dim)
    return jax.tree.map(one, batch)


def make_eval_step(model: SplitModel, mesh: Mesh | None = None, order: str = "zigzag"):
    """Jitted (TrainState, batch [b,t]) -> (cross-entropy sum, token count), with the
    state's parameters and router biases."""
    def evaluate(state: TrainState, batch, frozen):
        lm = model.merge(state.params, state.rest, frozen)
        logits, _, _ = lm(batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        ce, _ = token_losses(logits, batch["targets"])
        return jnp.sum(ce * mask), jnp.sum(mask)
    if mesh is None:
        return _with_frozen(jax.jit(evaluate), model)
    return _on_mesh(jax.jit(evaluate, out_shardings=sharding.replicated(mesh)), mesh, 0, model,
                    order=order)


def flops_per_token(cfg: Config, params, seq_len: int, frozen=None) -> float:
    """Training FLOPs per token: 6·N over the weights that multiply (everything but the
    input embedding lookup; a tied LM head counts once more) plus causal attention
    scores and values, 6·l·h·hd·t (half of the full 12·l·h·hd·t; PaLM, App. B).
    frozen: an adapter run's base weights, 4·N (forward and the input gradient; no
    weight gradient is computed for them). MoE models count every expert here, which
    overstates their MFU."""
    n = count_params(params, exclude_embeddings=True)
    n_frozen = 0 if frozen is None else count_params(frozen, exclude_embeddings=True)
    if cfg.tie_embeddings:
        if frozen is None:
            n += cfg.vocab_size * cfg.d_model
        else:
            n_frozen += cfg.vocab_size * cfg.d_model
    head_dim = cfg.v_head_dim if cfg.attention == "mla" else cfg.dim_per_head
    return 6.0 * n + 4.0 * n_frozen + 6.0 * cfg.n_layers * cfg.n_heads * head_dim * seq_len
