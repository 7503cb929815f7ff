"""The train step, optimizer, losses and mixed precision (tiny configs, a few steps)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from jaxlm.model import CausalLM, Config
from jaxlm.train.config import TrainConfig
from jaxlm.model.build import SplitModel
from jaxlm.train.step import (aux_loss, decay_mask, init_state, loss_and_grads,
                              make_optimizer, make_train_step, schedule)

CFG = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
             max_position=64)


def _batch(accum=1, b=4, t=16, seed=0, vocab=64):
    x = np.random.default_rng(seed).integers(0, vocab, size=(accum, b, t + 1))
    return {"inputs": jnp.asarray(x[..., :-1], jnp.int32),
            "targets": jnp.asarray(x[..., 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (accum, b, t)),
            "segment_ids": jnp.zeros((accum, b, t), jnp.int32),
            "loss_mask": jnp.ones((accum, b, t), bool)}


_TCFG = TrainConfig(steps=20, warmup_steps=2, lr=1e-2)
_MODEL = SplitModel.create(CFG, 0)
_lg = jax.jit(lambda p, b: loss_and_grads(_MODEL, _TCFG, p, b))  # one compile per shape


def _setup(cfg=CFG, **train):
    tcfg = TrainConfig(**{"steps": 20, "warmup_steps": 2, "lr": 1e-2, **train})
    model = SplitModel.create(cfg, 0)
    opt = make_optimizer(tcfg, model.params)
    return tcfg, model, opt, init_state(tcfg, cfg, model.params, opt)


def test_step_is_pure_and_loss_falls():
    tcfg, model, opt, state = _setup()
    step = make_train_step(model, tcfg, opt)
    batch = _batch()
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < losses[0] - 0.5
    # Same state and batch in, same bits out: nothing hidden outside the state.
    _, _, _, s1 = _setup()
    _, _, _, s2 = _setup()
    a, ma = step(s1, batch)
    b, mb = step(s2, batch)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(ma, mb)


def test_grad_accumulation_equals_one_big_batch():
    """SFT-style uneven micro-batches (3 target tokens in one, 28 in the other): the loss
    is normalised by the step's 31 targets, not a mean of the two micro-batch means."""
    big = _batch(1, b=4)
    mask = np.ones((1, 4, 16), bool)
    mask[0, :2] = False
    mask[0, 0, 4:7] = True                 # micro-batch 0 (rows 0-1): 3 targets
    mask[0, 2, :4] = False                 # micro-batch 1 (rows 2-3): 28 targets
    big["loss_mask"] = jnp.asarray(mask)
    split = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[2:]), big)
    l1, g1, _ = _lg(_MODEL.params, big)
    l2, g2, _ = _lg(_MODEL.params, split)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)
    halves = [_lg(_MODEL.params, jax.tree.map(lambda x: x[i:i + 1], split))[0]
              for i in range(2)]
    assert abs(float(np.mean(halves)) - float(l1)) > 1e-3   # what a mean of means gives


def test_loss_mask_drops_tokens():
    batch = _batch()
    masked = {**batch, "loss_mask": batch["loss_mask"].at[:, :, 8:].set(False)}
    other = _batch(seed=5)  # different tokens after position 8, masked out there
    changed = {**masked, **{k: masked[k].at[:, :, 8:].set(other[k][:, :, 8:])
                            for k in ("inputs", "targets")}}
    l1, g1, _ = _lg(_MODEL.params, masked)
    l2, g2, _ = _lg(_MODEL.params, changed)  # causal: the tail cannot matter
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)
    l3, _, _ = _lg(_MODEL.params, batch)
    assert abs(float(l3) - float(l1)) > 1e-4


def test_weight_decay_spares_norms_biases_and_optionally_embeddings():
    cfg = CFG.replace(qkv_bias=True, mlp_bias=True, norm="layer", position="learned")
    shapes = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes.to_pure_dict())
    for decay_embeddings in (True, False):
        mask = decay_mask(params, decay_embeddings)
        flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
        for path, decays in flat.items():
            if "'scale'" in path or "'bias'" in path:
                assert not decays, path
            elif "embedding" in path or "pos_embed" in path:
                assert decays == decay_embeddings, path
            else:
                assert decays, path
    # And the optimizer honours it: with zero gradients only decayed leaves move.
    tcfg = TrainConfig(weight_decay=0.5, lr=0.1, warmup_steps=0, decay_embeddings=False)
    opt = make_optimizer(tcfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    chex.assert_trees_all_equal(moved, decay_mask(params, False))


def test_schedule_warms_up_then_decays_to_the_floor():
    tcfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    lr = schedule(tcfg)
    assert 0 < float(lr(0)) <= 0.1 + 1e-6
    assert float(lr(5)) < float(lr(10))
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    assert float(lr(60)) < 1.0
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(tcfg.replace(warmup_steps=0))(0)), 1.0)


def test_aux_losses_are_weighted_by_key():
    tcfg = TrainConfig(aux_loss_weight=0.5, aux_loss_weights="router_z_loss=0.1")
    aux = {"load_balance_loss": jnp.float32(2.0), "router_z_loss": jnp.float32(3.0),
           "expert_load": jnp.ones(4)}  # not a loss: never added
    np.testing.assert_allclose(aux_loss(aux, tcfg), 0.5 * 2.0 + 0.1 * 3.0, rtol=1e-6)
    assert float(aux_loss({}, tcfg)) == 0.0
    with pytest.raises(ValueError, match="aux_loss_weights"):
        TrainConfig(aux_loss_weights="balance=0.1")


def test_moe_aux_losses_enter_the_step_loss_with_their_weights():
    cfg = CFG.replace(n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16)
    model = SplitModel.create(cfg, 0)
    tcfg = TrainConfig(aux_loss_weight=0.5, aux_loss_weights="router_z_loss=0.25")
    loss, grads, parts = jax.jit(lambda p: loss_and_grads(model, tcfg, p, _batch()))(
        model.params)
    balance, z = float(parts["aux/load_balance_loss"]), float(parts["aux/router_z_loss"])
    assert balance > 0 and z > 0
    np.testing.assert_allclose(float(loss), float(parts["ce"]) + 0.5 * balance + 0.25 * z,
                               rtol=1e-6)
    router = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
              if "router" in jax.tree_util.keystr(path)]
    assert router and all(np.isfinite(g).all() and np.any(g != 0) for g in router)


def test_z_loss_adds_mean_squared_logsumexp():
    batch = _batch()
    base, _, parts = _lg(_MODEL.params, batch)
    tz = _TCFG.replace(z_loss=1e-2)
    with_z, _, _ = jax.jit(lambda p: loss_and_grads(_MODEL, tz, p, batch))(_MODEL.params)
    lse = jax.nn.logsumexp(jnp.zeros((CFG.vocab_size,)))  # near-uniform logits at init
    assert float(parts["z_loss"]) == pytest.approx(float(lse) ** 2, rel=0.05)
    np.testing.assert_allclose(with_z - base, 1e-2 * parts["z_loss"], rtol=1e-4)


def test_bf16_compute_keeps_fp32_master_params_and_optimizer_state():
    cfg = CFG.replace(dtype="bfloat16")
    tcfg, model, opt, state = _setup(cfg)
    state, m = make_train_step(model, tcfg, opt)(state, _batch())
    assert np.isfinite(float(m["loss"]))
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert float(m["loss_scale"]) == 1.0  # bf16 needs no loss scaling


def test_fp16_dynamic_loss_scale_skips_overflow_and_halves():
    cfg = CFG.replace(dtype="float16")
    tcfg, model, opt, state = _setup(cfg)
    step = make_train_step(model, tcfg, opt)
    assert float(state.loss_scale) == 2.0 ** 15
    state, m = step(state, _batch())
    assert not bool(m["skipped"]) and np.isfinite(float(m["loss"]))
    before = jax.tree.map(np.asarray, state.params)
    state = state.replace(loss_scale=jnp.float32(3e38))  # fp16 gradients must overflow
    state, m = step(state, _batch(seed=1))
    assert bool(m["skipped"])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), before)
    assert float(state.loss_scale) == pytest.approx(1.5e38)
    assert int(state.step) == 2


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_gradients(remat):
    other = SplitModel.create(CFG.replace(remat=remat), 0)
    batch = _batch()
    _, g1, _ = _lg(_MODEL.params, batch)
    _, g2, _ = jax.jit(lambda p: loss_and_grads(other, _TCFG, p, batch))(_MODEL.params)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_the_gradient_adam_sees():
    params = SplitModel.create(CFG, 0).params
    grads = jax.tree.map(lambda p: jnp.full_like(p, 5.0), params)
    for clip, want in ((1e-3, 1e-3), (0.0, float(optax.global_norm(grads)))):  # 0: off
        opt = make_optimizer(TrainConfig(clip_norm=clip), params)
        _, st = jax.jit(opt.update)(grads, opt.init(params), params)
        mu = optax.tree_utils.tree_get(st, "mu")
        np.testing.assert_allclose(optax.global_norm(mu), (1 - 0.9) * want, rtol=1e-5)
