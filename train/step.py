"""Train state, optimizer and the one jitted step `(state, batch) -> (state, metrics)`.

The state is a plain pytree: fp32 master parameters (a nested dict, the same tree
`jaxlm.model.checkpoint.params_of` gives), the optax state, the step count, a PRNG
key, and the dynamic loss scale. The model computes in Config.dtype (bf16/fp16
casts happen inside its layers), so mixed precision needs nothing here beyond
keeping param_dtype float32 and, for fp16, scaling the loss.

A batch holds arrays shaped [accum, b, t]: `inputs`, `targets`, `positions`,
`segment_ids` and `loss_mask`. Micro-batches are summed with lax.scan, so one call
is one optimizer update whatever the accumulation.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxlm.model import Config
from jaxlm.model import build, sharding
from jaxlm.model.build import SplitModel

from .config import TrainConfig

# Dynamic loss scaling (fp16): start high, halve on overflow, double after a run of
# finite steps. The same constants as torch.amp.GradScaler.
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 15, 2000


class TrainState(struct.PyTreeNode):
    step: jax.Array          # int32 scalar: optimizer updates done
    params: Any              # nested dict of fp32 arrays (params_of layout)
    opt_state: Any           # optax state
    rng: jax.Array           # uint32[2] raw PRNG key, split once per step
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
               mesh: Mesh | None = None) -> TrainState:
    """The step-0 state. With a mesh the optimizer state is created in the shards of the
    parameters it mirrors (Adam's moments), scalars replicated."""
    def make(params):
        scale = INIT_SCALE if uses_loss_scale(tcfg, cfg) else 1.0
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          rng=jax.random.PRNGKey(tcfg.seed + 1),
                          loss_scale=jnp.asarray(scale, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32))
    if mesh is None:
        return make(params)
    return jax.jit(make, out_shardings=state_shardings(tcfg, cfg, optimizer, mesh))(params)


def state_shardings(tcfg: TrainConfig, cfg: Config, optimizer, mesh: Mesh) -> TrainState:
    """Where every TrainState array lives: parameters by the logical-axis rules, the
    optimizer's parameter-shaped state like its parameter, everything else replicated."""
    params = build.param_shardings(cfg, mesh)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s,
                                jax.eval_shape(optimizer.init, build.abstract_params(cfg)), params,
                                transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params, opt_state=opt, rng=rep, loss_scale=rep,
                      good_steps=rep)


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


def micro_loss(model: SplitModel, tcfg: TrainConfig, params, mb, n_tokens, n_micro):
    """This micro-batch's share of the step loss: token sums are divided by the step's
    total token count, so summing micro-batches equals one big batch exactly."""
    lm = model.merge(params)
    logits, _, aux = lm(mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"])
    mask = mb["loss_mask"].astype(jnp.float32)
    ce, lse = token_losses(logits, mb["targets"])
    ce_sum = jnp.sum(ce * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask)
    aux_total = aux_loss(aux, tcfg) / n_micro
    loss = (ce_sum + tcfg.z_loss * z_sum) / n_tokens + aux_total
    parts = {"ce": ce_sum / n_tokens, "z_loss": z_sum / n_tokens, "aux_loss": aux_total}
    parts.update({f"aux/{k}": jnp.mean(v) / n_micro for k, v in aux.items()})
    return loss, parts


def loss_and_grads(model: SplitModel, tcfg: TrainConfig, params, batch, scale=1.0):
    """(loss, grads, parts) of a whole [accum, b, t] batch; grads of loss × scale."""
    n_micro = batch["inputs"].shape[0]
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def one(mb):
        def f(p):
            loss, parts = micro_loss(model, tcfg, p, mb, n_tokens, n_micro)
            return loss * scale, (loss, parts)
        (_, (loss, parts)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, grads, parts

    if n_micro == 1:
        return one(jax.tree.map(lambda x: x[0], batch))

    def body(carry, mb):
        loss, grads, parts = one(mb)
        return jax.tree.map(jnp.add, carry, (loss, grads, parts)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jax.tree.map(lambda x: x[0], batch)))
    (loss, grads, parts), _ = jax.lax.scan(body, zero, batch)
    return loss, grads, parts


def make_train_step(model: SplitModel, tcfg: TrainConfig, optimizer, mesh: Mesh | None = None):
    """The jitted pure function (state, batch) -> (state, metrics); the state is donated.

    With a mesh: jax.jit with the state's shardings as outputs (inputs come sharded), the
    host batch [accum, b, t] laid out over the mesh by rows, metrics replicated, and the
    mesh in context while tracing (MoE layers then run expert-parallel)."""
    dynamic = uses_loss_scale(tcfg, model.cfg)
    lr_at = schedule(tcfg)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        scale = state.loss_scale if dynamic else jnp.float32(1.0)
        loss, grads, parts = loss_and_grads(model, tcfg, state.params, batch, scale)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        skipped = jnp.zeros((), jnp.bool_)
        if dynamic:  # overflowed: keep the old parameters, halve the scale
            finite = jnp.isfinite(grad_norm)
            skipped = ~finite
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa
            grow = finite & (state.good_steps + 1 >= GROWTH_INTERVAL)
            new = new.replace(
                params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                loss_scale=jnp.where(finite, jnp.where(grow, scale * 2, scale),
                                     jnp.maximum(scale / 2, 1.0)),
                good_steps=jnp.where(finite & ~grow, state.good_steps + 1, 0))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state.step),
                   "loss_scale": new.loss_scale, "skipped": skipped, **parts}
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    shardings = (state_shardings(tcfg, model.cfg, optimizer, mesh), sharding.replicated(mesh))
    return _on_mesh(jax.jit(step, donate_argnums=0, out_shardings=shardings), mesh, 1)


def _on_mesh(jitted, mesh: Mesh, batch_dim: int):
    """jitted(first, batch) run under the mesh, with the host batch made global first."""
    def run(first, batch):
        with jax.set_mesh(mesh):
            return jitted(first, sharding.global_batch(batch, mesh, batch_dim))
    run.jitted = jitted  # for lowering/inspection (under jax.set_mesh, on a global batch)
    return run


def make_eval_step(model: SplitModel, mesh: Mesh | None = None):
    """Jitted (params, batch [b,t]) -> (cross-entropy sum, token count)."""
    def evaluate(params, batch):
        lm = model.merge(params)
        logits, _, _ = lm(batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        ce, _ = token_losses(logits, batch["targets"])
        return jnp.sum(ce * mask), jnp.sum(mask)
    if mesh is None:
        return jax.jit(evaluate)
    return _on_mesh(jax.jit(evaluate, out_shardings=sharding.replicated(mesh)), mesh, 0)


def flops_per_token(cfg: Config, params, seq_len: int) -> float:
    """Training FLOPs per token: 6·N over the weights that multiply (everything but the
    input embedding lookup; a tied LM head counts once more) plus causal attention
    scores and values, 6·l·h·hd·t (half of the full 12·l·h·hd·t; PaLM, App. B).
    MoE models count every expert here, which overstates their MFU."""
    n = count_params(params, exclude_embeddings=True)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    head_dim = cfg.v_head_dim if cfg.attention == "mla" else cfg.dim_per_head
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.n_heads * head_dim * seq_len
