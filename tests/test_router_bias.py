"""Auxiliary-loss-free balancing in the train step (DeepSeek-V3): each optimizer step moves
every MoE layer's router bias by ±router_bias_rate toward equal expert load; the bias
lives in the TrainState and the forward pass reads it.

(Checkpointing the bias, SIGKILL + resume and export: tests/test_train_resume.py;
sharded over 'expert' and equal to one device: tests/test_sharding.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import Config
from jaxlm.model.build import SplitModel
from jaxlm.ops.moe import update_router_bias
from jaxlm.train.config import TrainConfig
from jaxlm.train.step import init_state, make_optimizer, make_train_step

E = 8
# Two MoE layers in one scanned group (router bias [2, e]), top-2 of 8, sigmoid router.
CFG = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
             n_experts=E, n_experts_per_tok=2, moe_ffn_dim=16, router="sigmoid",
             max_position=64)
B, T = 8, 16


def _batch(seed, accum=1):
    x = np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(accum, B, T + 1))
    return {"inputs": x[..., :-1].astype(np.int32), "targets": x[..., 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (accum, B, T)).copy(),
            "segment_ids": np.zeros((accum, B, T), np.int32),
            "loss_mask": np.ones((accum, B, T), bool)}


def skewed(params):
    """Parameters whose routers send most tokens to experts 0 and 1: every token's
    embedding shares a constant component along dimension 0 (the rest random, std 1),
    and both layers' routers read that component as extra score for experts 0 and 1."""
    rng = np.random.default_rng(1)
    emb = rng.normal(size=params["embed"]["embedding"].shape).astype(np.float32)
    emb[:, 0] = 1.5
    router = np.array(params["blocks"][0]["mlp"]["router"])  # [layers, d, e]
    router[:, 0, :2] += 0.15
    return {**params, "embed": {"embedding": jnp.asarray(emb)},
            "blocks": {0: {**params["blocks"][0], "mlp": {**params["blocks"][0]["mlp"],
                                                         "router": jnp.asarray(router)}}}}


@functools.cache  # built on first use, not when the sharded test runs this file
def _skewed_model():
    model = SplitModel.create(CFG, 0)
    return model, skewed(model.params)


@jax.jit
def _loads(params, rest, batch):
    """Per-MoE-layer expert load [layers, e] of one [b, t] batch under (params, rest)."""
    lm = _skewed_model()[0].merge(params, rest)
    return lm(batch["inputs"], positions=batch["positions"]).aux["expert_load_per_layer"]


def imbalance(state) -> float:
    """The worst layer's busiest expert over an even share, on held-out probe tokens."""
    probes = [_batch(1000 + i) for i in range(4)]
    load = np.mean([_loads(state.params, state.rest, jax.tree.map(lambda x: x[0], p))
                    for p in probes], axis=0)
    return float(np.max(load / load.mean(axis=-1, keepdims=True)))


def _state(tcfg):
    """(model, optimizer, initial state) over copies: the step donates the state's arrays."""
    model, params = _skewed_model()
    params, rest = jax.tree.map(jnp.copy, (params, model.rest.to_pure_dict()))
    opt = make_optimizer(tcfg, params)
    return model, opt, init_state(tcfg, CFG, params, opt, rest=rest)


# lr ~ 0 freezes the parameters (and the skew they carry): only the bias can rebalance.
_FROZEN = dict(steps=50, lr=1e-12, warmup_steps=0, weight_decay=0.0, batch_size=B, seq_len=T)


@pytest.mark.parametrize("rate", [0.0, TrainConfig.router_bias_rate])  # off, the default
def test_bias_update_rebalances_a_skewed_router(rate):
    tcfg = TrainConfig(**_FROZEN, router_bias_rate=rate)
    model, opt, state = _state(tcfg)
    step = make_train_step(model, tcfg, opt)
    before = imbalance(state)
    assert before > 2.5  # the skew: experts 0 and 1 take most token-slots
    for i in range(50):
        state, m = step(state, _batch(i))
    after = imbalance(state)
    print(f"rate {rate}: max/mean load {before:.3f} at step 0, {after:.3f} at step 50")
    bias = np.asarray(state.rest["blocks"][0]["mlp"]["router_bias"])
    if rate:
        assert after < 1.6 and after < 0.5 * before
        assert np.all(bias[:, :2] < 0) and float(m["router_bias_max"]) == np.abs(bias).max()
    else:
        assert after > 0.95 * before and not np.any(bias)


def test_step_routes_with_the_current_bias_and_averages_micro_batch_loads():
    """A large bias on expert 5 puts it in every token's top-2 (the forward reads the
    state's bias, not the initial one); with two micro-batches the bias moves by the
    sign of their mean load."""
    tcfg = TrainConfig(**_FROZEN, grad_accum=2, router_bias_rate=0.01)
    model, opt, state = _state(tcfg)
    start = np.zeros((2, E), np.float32)
    start[:, 5] = 10.0
    state = state.replace(rest={"blocks": {0: {"mlp": {"router_bias": jnp.asarray(start)}}}})
    batch = _batch(7, accum=2)
    per_micro = [np.asarray(_loads(state.params, state.rest, jax.tree.map(lambda x: x[i], batch)))
                 for i in range(2)]
    new, m = make_train_step(model, tcfg, opt)(state, batch)
    load = np.asarray(m["expert_load_per_layer"])
    np.testing.assert_allclose(load[:, 5], 0.5)  # one of each token's two slots
    np.testing.assert_allclose(load, (per_micro[0] + per_micro[1]) / 2, atol=1e-7)
    want = jax.vmap(update_router_bias, in_axes=(0, 0, None))(start, load, 0.01)
    np.testing.assert_array_equal(new.rest["blocks"][0]["mlp"]["router_bias"], want)


def test_rate_is_validated():
    with pytest.raises(ValueError, match="--router_bias_rate"):
        TrainConfig(router_bias_rate=-0.1)
    with pytest.raises(ValueError, match="--router_bias_rate"):
        TrainConfig(router_bias_rate=float("nan"))
