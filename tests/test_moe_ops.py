"""ops.moe against plain numpy loops over tokens and experts, and against transformers'
Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 routers and MoE blocks."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest, parameterized

from jaxlm.ops import moe

TOL = dict(rtol=1e-5, atol=1e-5)


def rand(seed, shape, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, np.float32)


def expert_weights(seed, e, d, f, gated=True):
    wg = rand(seed, (e, d, f), 0.4) if gated else None
    return wg, rand(seed + 1, (e, d, f), 0.4), rand(seed + 2, (e, f, d), 0.4)


# --------------------------------------------------------------- plain numpy references

def np_act(name, v):
    if name == "silu":
        return v / (1 + np.exp(-v))
    if name == "relu":
        return np.maximum(v, 0)
    if name == "gelu":
        return 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
    raise NotImplementedError(name)


def np_mlp(row, wg, wu, wd, act):
    """One expert on one token [d], float64."""
    row = row.astype(np.float64)
    up = row @ wu.astype(np.float64)
    h = np_act(act, up) if wg is None else np_act(act, row @ wg.astype(np.float64)) * up
    return h @ wd.astype(np.float64)


def np_softmax_router(logits, k, norm, scale):
    experts, weights = [], []
    for row in logits.astype(np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        w = np.array([p[i] for i in top])
        if norm:
            w /= w.sum()
        experts.append(top)
        weights.append(w * scale)
    return np.array(experts), np.array(weights)


def np_sigmoid_router(logits, k, bias, norm, scale, n_group, topk_group):
    e = logits.shape[1]
    size = e // n_group
    experts, weights = [], []
    for row in logits.astype(np.float64):
        s = 1 / (1 + np.exp(-row))
        choice = s + (0 if bias is None else bias)
        group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [i for i in range(e) if i // size in groups]
        top = sorted(candidates, key=lambda i: -choice[i])[:k]
        w = np.array([s[i] for i in top])
        if norm:
            w /= w.sum() + 1e-20
        experts.append(top)
        weights.append(w * scale)
    return np.array(experts), np.array(weights)


def np_moe(x, experts, weights, wg, wu, wd, act, kept=None):
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j, ex in enumerate(experts[t]):
            if kept is None or kept[t][j]:
                out[t] += weights[t][j] * np_mlp(x[t], None if wg is None else wg[ex],
                                                 wu[ex], wd[ex], act)
    return out


def np_capacity_kept(experts, e, c):
    """Switch priority: all first choices in token order, then all second choices..."""
    n, k = experts.shape
    used = [0] * e
    kept = np.zeros((n, k), bool)
    for j in range(k):
        for t in range(n):
            ex = experts[t][j]
            kept[t][j] = used[ex] < c
            used[ex] += 1
    return kept


def routing_of(experts, weights, e):
    """A Routing built by hand (probs/logits unused by the dispatches)."""
    n = len(experts)
    return moe.Routing(jnp.asarray(weights, jnp.float32), jnp.asarray(experts, jnp.int32),
                       jnp.full((n, e), 1.0 / e), jnp.zeros((n, e)))


def sort_by_expert(experts, weights):
    """HF's DeepSeek top-k is unsorted: compare (expert, weight) sets."""
    order = np.argsort(experts, axis=-1)
    return np.take_along_axis(experts, order, -1), np.take_along_axis(weights, order, -1)


# ----------------------------------------------------------------------------- routers

class RouterTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("switch_top1", 1, True, 1.0), ("mixtral_top2", 2, True, 1.0),
        ("qwen2_unnormalised", 3, False, 1.0), ("scaled", 2, True, 2.5))
    def test_softmax_router_vs_numpy(self, k, norm, scale):
        logits = rand(0, (16, 8), 2.0)
        r = moe.softmax_topk_router(jnp.asarray(logits), k, norm_topk_prob=norm,
                                    routed_scaling_factor=scale)
        chex.assert_shape([r.weights, r.experts, r.probs, r.logits], [(16, k), (16, k),
                                                                      (16, 8), (16, 8)])
        chex.assert_type([r.weights, r.experts], [jnp.float32, jnp.int32])
        want_e, want_w = np_softmax_router(logits, k, norm, scale)
        np.testing.assert_array_equal(r.experts, want_e)
        chex.assert_trees_all_close(r.weights, want_w, **TOL)
        chex.assert_trees_all_close(r.probs.sum(-1), np.ones(16), **TOL)

    @parameterized.named_parameters(
        ("plain", None, True, 1.0, 1, 1), ("bias", 0.3, True, 1.0, 1, 1),
        ("unnormalised", 0.3, False, 1.0, 1, 1),
        ("group_limited_bias_scaled", 0.3, True, 2.5, 4, 2),
        ("one_group_kept", 0.3, True, 1.5, 4, 1))
    def test_sigmoid_router_vs_numpy(self, bias_scale, norm, scale, n_group, topk_group):
        logits = rand(1, (32, 16), 1.5)
        bias = None if bias_scale is None else rand(2, (16,), bias_scale)
        r = moe.sigmoid_topk_router(
            jnp.asarray(logits), 3, bias=None if bias is None else jnp.asarray(bias),
            norm_topk_prob=norm, routed_scaling_factor=scale, n_group=n_group,
            topk_group=topk_group)
        want_e, want_w = np_sigmoid_router(logits, 3, bias, norm, scale, n_group, topk_group)
        np.testing.assert_array_equal(r.experts, want_e)
        chex.assert_trees_all_close(r.weights, want_w, **TOL)
        s = 1 / (1 + np.exp(-logits.astype(np.float64)))
        chex.assert_trees_all_close(r.probs, s / s.sum(-1, keepdims=True), **TOL)
        if n_group > 1:  # every choice lies in one of the topk_group kept groups
            groups = np.asarray(r.experts) // (16 // n_group)
            self.assertTrue(all(len(set(g)) <= topk_group for g in groups))

    def test_bias_moves_selection_not_weights(self):
        logits = rand(3, (8, 4))
        bias = jnp.array([0.0, 0.0, 0.0, 10.0])   # expert 3 always chosen, on bias alone
        r = moe.sigmoid_topk_router(jnp.asarray(logits), 2, bias=bias)
        self.assertTrue(bool((r.experts[:, 0] == 3).all()))
        s = 1 / (1 + np.exp(-logits.astype(np.float64)))
        chosen = np.take_along_axis(s, np.asarray(r.experts), -1)
        chex.assert_trees_all_close(r.weights, chosen / chosen.sum(-1, keepdims=True), **TOL)
        grad = jax.grad(lambda b: moe.sigmoid_topk_router(jnp.asarray(logits), 2, bias=b)
                        .weights.sum())(bias)
        chex.assert_trees_all_close(grad, jnp.zeros(4))  # the bias is never trained

    def test_hf_softmax_routers(self):
        from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
        x, w = rand(4, (20, 16)), rand(5, (6, 16))   # HF router weight is [e,d]
        cases = [(MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6,
                                                  num_experts_per_tok=2)), True),
                 (Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=6,
                                                    num_experts_per_tok=3,
                                                    norm_topk_prob=False)), False),
                 (Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=16, num_experts=6,
                                                    num_experts_per_tok=2,
                                                    norm_topk_prob=True)), True)]
        for hf, norm in cases:
            with torch.no_grad():
                hf.weight.copy_(torch.from_numpy(w))
                hf_logits, hf_w, hf_e = hf(torch.from_numpy(x))
            r = moe.softmax_topk_router(moe.router_logits(jnp.asarray(x), jnp.asarray(w.T)),
                                        hf.top_k, norm_topk_prob=norm)
            chex.assert_trees_all_close(r.logits, hf_logits.numpy(), **TOL)
            np.testing.assert_array_equal(r.experts, hf_e.numpy())
            chex.assert_trees_all_close(r.weights, hf_w.numpy(), **TOL)

    def test_hf_deepseek_v3_router(self):
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4,
                               n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               norm_topk_prob=True)
        hf = DeepseekV3TopkRouter(cfg)
        x, w, bias = rand(6, (24, 16)), rand(7, (16, 16)), rand(8, (16,), 0.2)
        with torch.no_grad():
            hf.weight.copy_(torch.from_numpy(w))
            hf.e_score_correction_bias.copy_(torch.from_numpy(bias))
            _, hf_w, hf_e = hf(torch.from_numpy(x))
        r = moe.sigmoid_topk_router(
            moe.router_logits(jnp.asarray(x), jnp.asarray(w.T)), 4, bias=jnp.asarray(bias),
            routed_scaling_factor=2.5, n_group=4, topk_group=2)
        got_e, got_w = sort_by_expert(np.asarray(r.experts), np.asarray(r.weights))
        want_e, want_w = sort_by_expert(hf_e.numpy(), hf_w.numpy())
        np.testing.assert_array_equal(got_e, want_e)
        chex.assert_trees_all_close(got_w, want_w, **TOL)

    def test_router_errors(self):
        logits = jnp.zeros((4, 8))
        for kwargs, field in [(dict(n_group=3), "n_group"), (dict(n_group=8), "n_group"),
                              (dict(n_group=4, topk_group=5), "topk_group"),
                              (dict(n_group=4, topk_group=1, k=3), "k=3")]:
            k = kwargs.pop("k", 2)
            with self.assertRaisesRegex(ValueError, field):
                moe.sigmoid_topk_router(logits, k, **kwargs)
        with self.assertRaisesRegex(ValueError, "k=9"):
            moe.softmax_topk_router(logits, 9)
        with self.assertRaisesRegex(ValueError, "bias"):
            moe.sigmoid_topk_router(logits, 2, bias=jnp.zeros(7))


# ------------------------------------------------------------------------------ losses

class LossTest(parameterized.TestCase):

    def test_load_balance_loss_vs_numpy(self):
        logits = rand(10, (32, 8), 2.0)
        r = moe.softmax_topk_router(jnp.asarray(logits), 2)
        experts, probs = np.asarray(r.experts), np.asarray(r.probs, np.float64)
        f = [sum(int(ex == i) for row in experts for ex in row) / (32 * 2) for i in range(8)]
        p = [sum(probs[t, i] for t in range(32)) / 32 for i in range(8)]
        want = 8 * sum(f[i] * p[i] for i in range(8))
        chex.assert_trees_all_close(moe.load_balance_loss(r.probs, r.experts), want, **TOL)

    def test_load_balance_loss_uniform_is_one_and_grows_with_collapse(self):
        n, e = 16, 4
        uniform = moe.load_balance_loss(jnp.full((n, e), 1 / e),
                                        jnp.array([[i % e, (i + 1) % e] for i in range(n)]))
        self.assertEqual(float(uniform), 1.0)
        losses = []
        for collapsed in range(0, n + 1, 4):   # tokens sent to expert 0 with probability 1
            probs = np.full((n, e), 1 / e, np.float32)
            probs[:collapsed] = np.eye(e)[0]
            experts = np.array([[0] if t < collapsed else [t % e] for t in range(n)])
            losses.append(float(moe.load_balance_loss(jnp.asarray(probs), jnp.asarray(experts))))
        self.assertAlmostEqual(losses[0], 1.0, places=6)
        self.assertAlmostEqual(losses[-1], float(e), places=6)
        self.assertTrue(all(a < b for a, b in zip(losses, losses[1:])), losses)
        # collapse through the real router: one dominant logit, top-1 → e
        logits = jnp.asarray(rand(11, (n, e))).at[:, 2].add(100.0)
        r = moe.softmax_topk_router(logits, 1)
        chex.assert_trees_all_close(moe.load_balance_loss(r.probs, r.experts), float(e), **TOL)

    def test_load_balance_loss_matches_hf_times_k_and_masks(self):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        logits = rand(12, (2, 10, 8), 1.5)
        mask = np.ones((2, 10), np.int64)
        mask[1, 6:] = 0
        flat = jnp.asarray(logits.reshape(20, 8))
        r = moe.softmax_topk_router(flat, 2)
        for m in (None, mask):
            want = load_balancing_loss_func(
                (torch.from_numpy(logits.reshape(20, 8)),), 8, 2,
                None if m is None else torch.from_numpy(m)).item()
            got = moe.load_balance_loss(r.probs, r.experts,
                                        None if m is None else jnp.asarray(m.reshape(-1)))
            chex.assert_trees_all_close(2 * got, want, **TOL)   # HF's value is k × ours

    def test_router_z_loss(self):
        logits = rand(13, (12, 6), 3.0)
        lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.astype(np.float64)]
        want = sum(v * v for v in lse) / 12
        chex.assert_trees_all_close(moe.router_z_loss(jnp.asarray(logits)), want, **TOL)
        mask = np.arange(12) < 5
        want = sum(v * v for v in lse[:5]) / 5
        chex.assert_trees_all_close(moe.router_z_loss(jnp.asarray(logits), jnp.asarray(mask)),
                                    want, **TOL)

    def test_update_router_bias_rule_and_balancing(self):
        load = jnp.array([10.0, 2.0, 4.0, 4.0])     # mean 5
        new = moe.update_router_bias(jnp.zeros(4), load, 0.1)
        chex.assert_trees_all_close(new, jnp.array([-0.1, 0.1, 0.1, 0.1]))
        chex.assert_trees_all_close(moe.update_router_bias(new, jnp.full(4, 3.0), 0.1), new)

        # A router skewed towards experts 0-1 balances once the bias has had a few steps.
        e, k = 8, 2
        logits = jnp.asarray(rand(14, (256, e))) + jnp.array([2.0, 1.5] + [0.0] * 6)

        def load(bias):
            return moe.expert_load(moe.sigmoid_topk_router(logits, k, bias=bias).experts, e)

        @jax.jit
        def train(bias):
            def step(bias, _):
                return moe.update_router_bias(bias, load(bias), 0.02), load(bias)
            return jax.lax.scan(step, bias, None, length=100)

        bias, loads = train(jnp.zeros(e))
        spread = loads.max(-1) - loads.min(-1)        # loads[i]: load before step i
        # a fixed-size sign step ends in a small limit cycle, so judge the last 10 steps
        self.assertLess(float(spread[-10:].max()), 0.25 * float(spread[0]))
        self.assertLess(float(bias[0]), 0.0)   # the favoured expert was pushed down


# -------------------------------------------------------------------------- dispatches

def dispatch_fn(name, **kw):
    if name == "dense":
        return functools.partial(moe.moe_dense, **kw)
    if name == "dropless":
        return functools.partial(moe.moe_dropless, **kw)
    kw.setdefault("capacity_factor", 8.0)   # large enough that nothing is dropped
    return lambda *a: moe.moe_capacity(*a, **kw)[0]


def routed_loss(name, router, x, w_router, wg, wu, wd, cot):
    """⟨dispatch output, cot⟩ with routing computed from x, so gradients reach w_router."""
    logits = moe.router_logits(x, w_router)
    if router == "softmax":
        r = moe.softmax_topk_router(logits, 2)
    else:
        r = moe.sigmoid_topk_router(logits, 2, bias=jnp.array([0.1, -0.2, 0.05, 0.0]),
                                    n_group=2, topk_group=1, routed_scaling_factor=2.0)
    return jnp.sum(dispatch_fn(name)(x, r, wg, wu, wd) * cot)


@functools.partial(jax.jit, static_argnums=0)
def oracle_grad(router, *args):
    """Gradient of the dense oracle, compiled once per router."""
    loss = functools.partial(routed_loss, "dense", router)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)


class DispatchTest(chex.TestCase):
    # One set of shapes for every test here: un-jitted JAX compiles each primitive per
    # shape, so shared shapes keep the without_jit variants cheap.
    n, d, f, e = 8, 12, 10, 4

    def make_inputs(self, seed, gated=True):
        x = rand(seed, (self.n, self.d))
        w_router = rand(seed + 1, (self.d, self.e))
        return x, w_router, expert_weights(seed + 2, self.e, self.d, self.f, gated)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("swiglu_top2", "silu", True, 2), ("gelu_nongated_top1", "gelu", False, 1))
    def test_dispatches_match_numpy_loop(self, act, gated, k):
        x, w_router, (wg, wu, wd) = self.make_inputs(20, gated)
        r = moe.softmax_topk_router(moe.router_logits(jnp.asarray(x), jnp.asarray(w_router)), k)
        want = np_moe(x, np.asarray(r.experts), np.asarray(r.weights), wg, wu, wd, act)
        for name in ("dense", "dropless", "capacity"):
            out = self.variant(dispatch_fn(name, activation=act))(x, r, wg, wu, wd)
            chex.assert_shape(out, (self.n, self.d))
            chex.assert_trees_all_close(out, want, **TOL, custom_message=name)

    @chex.variants(with_jit=True, without_jit=True)
    def test_capacity_drops_exactly_the_overflow(self):
        # n=8, k=1, e=4, factor 1.5 → capacity ceil(1.5·8/4) = 3; expert 0 gets tokens
        # 0,2,4,5,7, so exactly tokens 5 and 7 are dropped.
        experts = [[0], [1], [0], [2], [0], [0], [3], [0]]
        weights = rand(21, (8, 1)) ** 2 + 0.5
        r = routing_of(experts, weights, 4)
        x = rand(22, (8, self.d))
        wg, wu, wd = expert_weights(23, 4, self.d, self.f)
        self.assertEqual(moe.expert_capacity(8, 1, 4, 1.5), 3)
        fn = self.variant(functools.partial(moe.moe_capacity, capacity_factor=1.5))
        out, dropped = fn(x, r, wg, wu, wd)
        chex.assert_trees_all_close(dropped, 2 / 8)
        kept = np.array([[t not in (5, 7)] for t in range(8)])
        want = np_moe(x, experts, weights, wg, wu, wd, "silu", kept)
        chex.assert_trees_all_close(out, want, **TOL)
        chex.assert_trees_all_close(out[np.array([5, 7])], np.zeros((2, self.d)))
        dispatch, combine, _ = moe.capacity_dispatch(r, 4, 3)
        chex.assert_shape([dispatch, combine], [(8, 4, 3)] * 2)
        self.assertEqual([int(dispatch[t, 0].argmax()) for t in (0, 2, 4)], [0, 1, 2])
        chex.assert_trees_all_close(dispatch.sum((1, 2)), kept[:, 0].astype(np.float32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_capacity_first_choices_before_second(self):
        # Capacity ceil(1.0·8·2/4) = 4. Expert 0 is the first choice of tokens 1-4 and
        # the second choice of token 0: token 0's slot is the one dropped, although
        # token 0 comes first. Experts 1-3 receive at most 4 token-slots each.
        experts = [[1, 0], [0, 2], [0, 3], [0, 1], [0, 2], [1, 2], [2, 3], [3, 1]]
        weights = rand(24, (8, 2)) ** 2 + 0.5
        x = rand(25, (8, self.d))
        wg, wu, wd = expert_weights(26, 4, self.d, self.f)
        self.assertEqual(moe.expert_capacity(8, 2, 4, 1.0), 4)
        fn = self.variant(functools.partial(moe.moe_capacity, capacity_factor=1.0))
        out, dropped = fn(x, routing_of(experts, weights, 4), wg, wu, wd)
        kept = np_capacity_kept(np.array(experts), 4, 4)
        self.assertFalse(kept[0, 1])
        self.assertEqual(int((~kept).sum()), 1)
        chex.assert_trees_all_close(dropped, 1 / 16)
        chex.assert_trees_all_close(out, np_moe(x, experts, weights, wg, wu, wd, "silu", kept),
                                    **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_capacity_small_factor_matches_numpy_dropping(self):
        x, w_router, (wg, wu, wd) = self.make_inputs(27)
        logits = jnp.asarray(rand(28, (self.n, self.e))).at[:, 0].add(1.0)  # crowd expert 0
        r = moe.softmax_topk_router(logits, 2)
        fn = self.variant(functools.partial(moe.moe_capacity, capacity_factor=0.75))
        out, dropped = fn(x, r, wg, wu, wd)
        c = moe.expert_capacity(self.n, 2, self.e, 0.75)
        kept = np_capacity_kept(np.asarray(r.experts), self.e, c)
        self.assertGreater(int((~kept).sum()), 0)
        chex.assert_trees_all_close(dropped, (~kept).mean(), **TOL)
        want = np_moe(x, np.asarray(r.experts), np.asarray(r.weights), wg, wu, wd, "silu", kept)
        chex.assert_trees_all_close(out, want, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_agree_and_reach_router(self):
        """d/d(x, router weight, expert weights): dropless and capacity equal the oracle."""
        args = self.grad_args(30)
        want = oracle_grad("softmax", *args)
        for name in ("dropless", "capacity"):
            got = self.variant(jax.grad(functools.partial(routed_loss, name, "softmax"),
                                        argnums=(0, 1, 2, 3, 4)))(*args)
            self.assertGreater(float(jnp.abs(got[1]).max()), 1e-3)  # reaches the router
            chex.assert_trees_all_close(got, want, **TOL, custom_message=name)

    def test_sigmoid_router_gradient_matches_oracle(self):
        """The same through the grouped, biased, scaled sigmoid router (jitted)."""
        args = self.grad_args(33)
        got = jax.jit(jax.grad(functools.partial(routed_loss, "dropless", "sigmoid"),
                               argnums=(0, 1, 2, 3, 4)))(*args)
        self.assertGreater(float(jnp.abs(got[1]).max()), 1e-3)
        chex.assert_trees_all_close(got, oracle_grad("sigmoid", *args), **TOL)

    def grad_args(self, seed):
        x, w_router, (wg, wu, wd) = self.make_inputs(seed)
        cot = rand(seed + 5, (self.n, self.d))
        return tuple(jnp.asarray(a) for a in (x, w_router, wg, wu, wd, cot))

    def test_routed_experts_names_and_shape_errors(self):
        x, w_router, (wg, wu, wd) = self.make_inputs(35)
        r = moe.softmax_topk_router(moe.router_logits(jnp.asarray(x), jnp.asarray(w_router)), 2)
        base = moe.moe_dense(x, r, wg, wu, wd)
        for name in moe.DISPATCHES:
            y, dropped = moe.routed_experts(x, r, wg, wu, wd, dispatch=name, capacity_factor=4.0)
            chex.assert_trees_all_close(y, base, **TOL)
            self.assertEqual(float(dropped), 0.0)
        with self.assertRaisesRegex(ValueError, "dispatch='ragged'"):
            moe.routed_experts(x, r, wg, wu, wd, dispatch="ragged")
        with self.assertRaisesRegex(ValueError, r"\[n,d\]"):
            moe.moe_dropless(x[None], r, wg, wu, wd)
        with self.assertRaisesRegex(ValueError, "w_gate"):
            moe.moe_dense(x, r, wg[:, :, :3], wu, wd)
        with self.assertRaisesRegex(ValueError, "capacity_factor"):
            moe.moe_capacity(x, r, wg, wu, wd, capacity_factor=0.0)


# ----------------------------------------------------------- shared experts and HF blocks

class SharedAndHFBlockTest(parameterized.TestCase):

    def test_add_shared_experts_vs_numpy(self):
        x, routed = rand(40, (10, 8)), rand(41, (10, 8))
        wg, wu, wd = rand(42, (8, 12), 0.4), rand(43, (8, 12), 0.4), rand(44, (12, 8), 0.4)
        gate_w = rand(45, (8, 1))
        for g in (None, gate_w):
            got = moe.add_shared_experts(jnp.asarray(routed), jnp.asarray(x), wg, wu, wd,
                                         w_shared_gate=g)
            want = np.empty((10, 8))
            for t in range(10):
                shared = np_mlp(x[t], wg, wu, wd, "silu")
                if g is not None:
                    shared = shared / (1 + math.exp(-float(x[t].astype(np.float64) @ g[:, 0])))
                want[t] = routed[t] + shared
            chex.assert_trees_all_close(got, want, **TOL)

    @staticmethod
    def hf_expert_weights(experts):
        """HF fused experts: gate_up_proj [e,2f,d] (gate rows first), down_proj [e,d,f]."""
        gate_up = experts.gate_up_proj.detach().numpy()
        f = gate_up.shape[1] // 2
        return (gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1),
                experts.down_proj.detach().numpy().transpose(0, 2, 1))

    @staticmethod
    def randomise(module, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in list(module.parameters()) + list(module.buffers()):
                p.copy_(torch.randn_like(p) * 0.3)

    def test_deepseek_v3_moe_block(self):
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        # DispatchTest's shapes (n=8, d=12, f=10, e=4), so eager ops are already compiled
        cfg = DeepseekV3Config(hidden_size=12, moe_intermediate_size=10, n_routed_experts=4,
                               num_experts_per_tok=2, n_group=2, topk_group=1,
                               n_shared_experts=2, routed_scaling_factor=2.5)
        hf = DeepseekV3MoE(cfg).eval()
        self.randomise(hf, 0)
        x = rand(46, (2, 4, 12))
        with torch.no_grad():
            want = hf(torch.from_numpy(x)).numpy().reshape(8, 12)
        flat = jnp.asarray(x.reshape(8, 12))
        r = moe.sigmoid_topk_router(
            moe.router_logits(flat, hf.gate.weight.detach().numpy().T), 2,
            bias=jnp.asarray(hf.gate.e_score_correction_bias.numpy()), n_group=2, topk_group=1,
            routed_scaling_factor=2.5)
        wg, wu, wd = self.hf_expert_weights(hf.experts)
        s = hf.shared_experts
        for name in ("dropless", "capacity"):   # dense = dropless is tested above
            routed, _ = moe.routed_experts(flat, r, wg, wu, wd, dispatch=name,
                                           capacity_factor=8.0)
            got = moe.add_shared_experts(routed, flat, s.gate_proj.weight.detach().numpy().T,
                                         s.up_proj.weight.detach().numpy().T,
                                         s.down_proj.weight.detach().numpy().T)
            chex.assert_trees_all_close(got, want, **TOL, custom_message=name)

    def test_qwen2_moe_block_with_shared_gate(self):
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        cfg = Qwen2MoeConfig(hidden_size=12, moe_intermediate_size=10, num_experts=4,
                             num_experts_per_tok=2, norm_topk_prob=False,
                             shared_expert_intermediate_size=12)
        hf = Qwen2MoeSparseMoeBlock(cfg).eval()
        self.randomise(hf, 1)
        x = rand(47, (2, 4, 12))
        with torch.no_grad():
            want = hf(torch.from_numpy(x)).numpy().reshape(8, 12)
        flat = jnp.asarray(x.reshape(8, 12))
        r = moe.softmax_topk_router(moe.router_logits(flat, hf.gate.weight.detach().numpy().T),
                                    2, norm_topk_prob=False)
        s = hf.shared_expert
        got = moe.add_shared_experts(
            moe.moe_dropless(flat, r, *self.hf_expert_weights(hf.experts)), flat,
            s.gate_proj.weight.detach().numpy().T, s.up_proj.weight.detach().numpy().T,
            s.down_proj.weight.detach().numpy().T,
            w_shared_gate=hf.shared_expert_gate.weight.detach().numpy().T)
        chex.assert_trees_all_close(got, want, **TOL)


if __name__ == "__main__":
    absltest.main()
