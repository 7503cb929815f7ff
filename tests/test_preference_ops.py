"""jaxlm.ops.preference against TRL's own loss code: values and gradients w.r.t. all four
log-probs, on random pairs. TRL 1.16 has no standalone loss functions, so its trainer
methods are called unbound with a stand-in `self` that holds only the attributes they read.
"""
import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops import preference as P

torch = pytest.importorskip("torch")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

TOL = dict(rtol=1e-6, atol=1e-6)
CPU = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)


def pairs(seed, b=8):
    """Random policy/reference sequence log-probs and completion lengths for b pairs."""
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-20.0, -5.0, (4, b)).astype(np.float32)
    lens = rng.integers(3, 41, (2, b))
    return (*logps, *lens)


def leaves(*arrays):
    return [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in arrays]


def torch_grads(loss, ts):
    loss.backward()
    return [t.grad.numpy() for t in ts]


def jax_value_and_grads(fn, logps, **kw):
    """fn's per-pair losses and the gradient of their mean w.r.t. each array in logps."""
    mean = lambda *a: jnp.mean(fn(*a, **kw))
    grads = jax.grad(mean, argnums=tuple(range(len(logps))))(*map(jnp.asarray, logps))
    return np.asarray(fn(*map(jnp.asarray, logps), **kw)), [np.asarray(g) for g in grads]


# --- TRL oracles ------------------------------------------------------------------------

def trl_dpo(loss_type, c, r, rc, rr, lc, lr, *, beta, eps=0.0):
    """DPOTrainer._compute_loss with precomputed reference log-probs; a fake model returns
    per-token log-probs holding each sequence's total in column 0 and zeros elsewhere."""
    b, t = len(c), int(max(lc.max(), lr.max())) + 1
    ts = leaves(c, r, rc, rr)
    col = torch.cat([ts[0], ts[1]])[:, None]
    log_probs = torch.cat([col, torch.zeros(2 * b, t - 2)], dim=1)
    # completion tokens sit after a one-token prompt, so both the mask (IPO's lengths)
    # and its shifted copy (metrics) hold exactly len ones per row
    lens = torch.tensor(np.concatenate([lc, lr]))
    completion_mask = (torch.arange(t)[None] >= 1) & (torch.arange(t)[None] <= lens[:, None])
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2 * b, t - 1),
                                    mean_logits=torch.zeros(2 * b, t - 1),
                                    is_top1=torch.zeros(2 * b, t - 1, dtype=torch.bool))
    inputs = dict(input_ids=torch.zeros(2 * b, t, dtype=torch.long),
                  attention_mask=torch.ones(2 * b, t, dtype=torch.long),
                  completion_mask=completion_mask.long(),
                  ref_chosen_logps=ts[2], ref_rejected_logps=ts[3])
    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=CPU, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    loss = dpo_trainer.DPOTrainer._compute_loss(self, lambda **kw: outputs, inputs, False)
    return loss.item(), torch_grads(loss, ts), self._metrics["train"]


def trl_cpo(loss_type, chosen, rejected, ts, *, beta, eps=0.0, gamma=0.0):
    """CPOTrainer.cpo_loss: per-pair losses on whatever 'policy log-probs' it is fed."""
    self = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps,
                                 simpo_gamma=gamma, accelerator=CPU)
    losses, _, _ = cpo_trainer.CPOTrainer.cpo_loss(self, chosen, rejected)
    return losses.detach().numpy(), torch_grads(losses.mean(), ts)


def trl_orpo_term(chosen_avg, rejected_avg, ts, *, beta):
    """ORPOTrainer.odds_ratio_loss returns β·log σ(log odds); ORPO's loss is nll − its mean."""
    self = types.SimpleNamespace(beta=beta, accelerator=CPU)
    losses = orpo_trainer.ORPOTrainer.odds_ratio_loss(self, chosen_avg, rejected_avg)[0]
    return (-losses).detach().numpy(), torch_grads((-losses).mean(), ts)


# --- each loss equals TRL ---------------------------------------------------------------

DPO_CASES = [("dpo", "sigmoid", 0.1, 0.0), ("dpo", "sigmoid", 0.5, 0.0),
             ("hinge", "hinge", 0.1, 0.0), ("hinge", "hinge", 0.5, 0.0),
             ("ipo", "ipo", 0.1, 0.0), ("ipo", "ipo", 0.5, 0.0),
             ("robust", "robust", 0.1, 0.1), ("robust", "robust", 0.5, 0.2)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,trl_name,beta,eps", DPO_CASES)
def test_matches_trl_dpo_trainer(name, trl_name, beta, eps, seed):
    c, r, rc, rr, lc, lr = pairs(seed)
    kw = {"beta": beta, "eps": eps} if name == "robust" else {"beta": beta}
    fn = {"dpo": P.dpo_loss, "hinge": P.hinge_loss, "robust": P.robust_dpo_loss,
          "ipo": lambda *a, **k: P.ipo_loss(*a, **k, chosen_len=lc, rejected_len=lr)}[name]
    ours, grads = jax_value_and_grads(fn, (c, r, rc, rr), **kw)
    loss, want, metrics = trl_dpo(trl_name, c, r, rc, rr, lc, lr, beta=beta, eps=eps)
    np.testing.assert_allclose(ours.mean(), loss, **TOL)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, **TOL)
    chosen_rewards, rejected_rewards = P.rewards(c, r, rc, rr, beta=beta)
    np.testing.assert_allclose(jnp.mean(chosen_rewards), metrics["rewards/chosen"][0], **TOL)
    np.testing.assert_allclose(jnp.mean(rejected_rewards), metrics["rewards/rejected"][0], **TOL)


@pytest.mark.parametrize("seed,beta,eps", [(0, 0.1, 0.1), (1, 0.5, 0.2), (2, 0.5, 0.0)])
def test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios(seed, beta, eps):
    c, r, rc, rr, _, _ = pairs(seed)
    ours, grads = jax_value_and_grads(P.cdpo_loss, (c, r, rc, rr), beta=beta, eps=eps)
    ts = leaves(c, r, rc, rr)
    want, want_grads = trl_cpo("sigmoid", ts[0] - ts[2], ts[1] - ts[3], ts, beta=beta, eps=eps)
    np.testing.assert_allclose(ours, want, **TOL)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("seed,beta,gamma,eps", [(0, 0.5, 0.5, 0.0), (1, 2.0, 1.0, 0.1),
                                                 (2, 0.1, 0.3, 0.2)])
def test_simpo_matches_trl_cpo_simpo(seed, beta, gamma, eps):
    c, r, _, _, lc, lr = pairs(seed)
    kw = dict(beta=beta, gamma=gamma, eps=eps, chosen_len=lc, rejected_len=lr)
    ours, grads = jax_value_and_grads(P.simpo_loss, (c, r), **kw)
    ts = leaves(c, r)
    n_c, n_r = torch.tensor(lc, dtype=torch.float32), torch.tensor(lr, dtype=torch.float32)
    want, want_grads = trl_cpo("simpo", ts[0] / n_c, ts[1] / n_r, ts,
                               beta=beta, eps=eps, gamma=gamma)
    np.testing.assert_allclose(ours, want, **TOL)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.5)])
def test_orpo_matches_trl_odds_ratio_loss(seed, beta):
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 41, (2, 8))
    # averages on both sides of −ln 2, where log1mexp switches formula
    avg = rng.uniform(-3.0, -0.05, (2, 8)).astype(np.float32)
    c, r = (avg * lens).astype(np.float32)
    kw = dict(beta=beta, chosen_len=lens[0], rejected_len=lens[1])
    ours, grads = jax_value_and_grads(P.orpo_loss, (c, r), **kw)
    ts = leaves(c, r)
    n_c, n_r = (torch.tensor(n, dtype=torch.float32) for n in lens)
    want, want_grads = trl_orpo_term(ts[0] / n_c, ts[1] / n_r, ts, beta=beta)
    np.testing.assert_allclose(ours, want, **TOL)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, **TOL)


# --- properties -------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_at_reference_is_ln2_and_margin_gradient_is_minus_beta_over_2(beta):
    c, r, _, _, _, _ = pairs(3)
    np.testing.assert_allclose(P.dpo_loss(c, r, c, r, beta=beta), math.log(2), rtol=1e-6)
    d_margin = jax.grad(lambda m: P.dpo_loss(m, 0.0, 0.0, 0.0, beta=beta))(0.0)
    np.testing.assert_allclose(d_margin, -beta / 2, rtol=1e-6)
    d_c, d_r = jax.grad(lambda a, b: P.dpo_loss(a, b, 0.0, 0.0, beta=beta), (0, 1))(0.0, 0.0)
    np.testing.assert_allclose([d_c, d_r], [-beta / 2, beta / 2], rtol=1e-6)


def test_rewards_carry_no_gradient():
    g = jax.grad(lambda c: sum(jnp.sum(x) for x in P.rewards(c, c, 0.0, 0.0, beta=0.5)))
    assert g(jnp.ones(3)).tolist() == [0.0, 0.0, 0.0]


def np_sequence_logps(logits, targets, mask):
    x = logits.astype(np.float64)
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if mask[i, j]:
                row = x[i, j] - x[i, j].max()
                out[i] += row[targets[i, j]] - np.log(np.exp(row).sum())
    return out


def test_sequence_logps_matches_numpy_and_its_gradient_is_onehot_minus_softmax():
    rng = np.random.default_rng(4)
    b, t, v = 3, 7, 11
    logits = (3 * rng.standard_normal((b, t, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    mask = rng.random((b, t)) < 0.6
    targets[~mask] = -100  # padding ids in masked slots must not matter
    seq_logps = jax.jit(P.sequence_logps)  # one compile beats op-by-op eager dispatch here
    np.testing.assert_allclose(seq_logps(logits, targets, mask),
                               np_sequence_logps(logits, targets, mask), rtol=1e-5, atol=1e-5)
    # bf16 logits are upcast before the softmax, so they match numpy on the rounded values
    low = jnp.asarray(logits, jnp.bfloat16)
    got = seq_logps(low, targets, mask)
    assert got.dtype == jnp.float32
    want = np_sequence_logps(np.asarray(low, np.float32), targets, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda x: P.sequence_logps(x, targets, mask).sum()))(logits)
    onehot = np.eye(v)[np.where(mask, targets, 0)]
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, (onehot - softmax) * mask[..., None], atol=1e-6)


# --- dispatch and errors ----------------------------------------------------------------

def test_preference_loss_dispatches_to_each_function():
    c, r, rc, rr, lc, lr = pairs(5)
    lens = dict(chosen_len=lc, rejected_len=lr)
    hp = dict(beta=0.3, eps=0.15, gamma=0.7)
    direct = {
        "dpo": P.dpo_loss(c, r, rc, rr, beta=0.3),
        "ipo": P.ipo_loss(c, r, rc, rr, beta=0.3, **lens),
        "cdpo": P.cdpo_loss(c, r, rc, rr, beta=0.3, eps=0.15),
        "robust": P.robust_dpo_loss(c, r, rc, rr, beta=0.3, eps=0.15),
        "hinge": P.hinge_loss(c, r, rc, rr, beta=0.3),
        "simpo": P.simpo_loss(c, r, beta=0.3, gamma=0.7, eps=0.15, **lens),
        "orpo": P.orpo_loss(c, r, beta=0.3, **lens),
    }
    assert set(direct) == set(P.LOSSES)
    for name, want in direct.items():
        np.testing.assert_array_equal(P.preference_loss(name, c, r, rc, rr, lc, lr, **hp), want)
    for name in P.REFERENCE_FREE:
        np.testing.assert_array_equal(P.preference_loss(name, c, r, None, None, lc, lr, **hp),
                                      direct[name])


@pytest.mark.parametrize("name,refs,match", [
    ("kto", True, "unknown; choose one of"),
    ("dpo", False, "needs ref_chosen and ref_rejected"),
    ("robust", False, "needs ref_chosen and ref_rejected"),
])
def test_preference_loss_errors_are_one_line(name, refs, match):
    c, r, rc, rr, lc, lr = pairs(6)
    ref = (rc, rr) if refs else (None, None)
    with pytest.raises(ValueError, match=match) as err:
        P.preference_loss(name, c, r, *ref, lc, lr, beta=0.1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_eps_outside_zero_to_half(eps):
    c, r, rc, rr, _, _ = pairs(7)
    with pytest.raises(ValueError, match="eps"):
        P.robust_dpo_loss(c, r, rc, rr, beta=0.1, eps=eps)


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo"])
def test_length_normalised_losses_need_lengths(name):
    c, r, rc, rr, _, _ = pairs(8)
    with pytest.raises(ValueError, match="needs chosen_len and rejected_len"):
        P.preference_loss(name, c, r, rc, rr, None, None, beta=0.1)
