"""Preference-optimisation losses (the DPO family) as pure functions of sequence log-probs.

Every loss takes float arrays shaped [b], one entry per preference pair, and returns the
per-pair loss [b]; the trainer averages. `chosen`/`rejected` are the policy's log-probs
summed over completion tokens (see `sequence_logps`), `ref_chosen`/`ref_rejected` the
frozen reference model's, `chosen_len`/`rejected_len` the completion token counts. With
    Δ = (chosen − ref_chosen) − (rejected − ref_rejected)
the names follow the papers:

    name     paper                                   TRL equivalent
    dpo      Rafailov et al. 2023, DPO               DPOConfig(loss_type="sigmoid")
    cdpo     Mitchell 2023, conservative DPO         CPOTrainer "sigmoid" + label_smoothing=ε on
                                                     log-ratios; TRL<1.0 DPO "sigmoid" + label_smoothing
    robust   Chowdhury et al. 2024, rDPO             DPOConfig(loss_type="robust", label_smoothing=ε)
    hinge    Zhao et al. 2023, SLiC-HF               DPOConfig(loss_type="hinge")
    ipo      Azar et al. 2023, IPO (eq. 17)          DPOConfig(loss_type="ipo"), length-normalised
    simpo    Meng et al. 2024, SimPO (no reference)  CPOConfig(loss_type="simpo", simpo_gamma=γ)
    orpo     Hong et al. 2024, ORPO (no reference)   ORPOTrainer's odds_ratio_loss, negated

What 'label smoothing' means here and elsewhere
-----------------------------------------------
The same knob names two different losses. In TRL ≥ 1.0's DPOTrainer, `label_smoothing` is
the ε of the robust loss ("robust"), of EXO and of AOT; the plain "sigmoid" loss ignores
it. In TRL < 1.0's DPOTrainer, in TRL's CPOTrainer and in SimPO's reference code,
`label_smoothing` on "sigmoid" is conservative DPO: the target label is flipped with
probability ε, giving −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ). rDPO instead *unbiases* the loss
for flipped labels and divides by 1−2ε. Here `cdpo` and `robust` are separate names, each
taking its own `eps`, so a config never silently means the other one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOSSES = ("dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def sequence_logps(logits, targets, mask):
    """Σ_t mask·log p(target_t): logits [b,t,v], targets [b,t] int, mask [b,t] → [b] f32.

    Picks the target logit and subtracts logsumexp rather than forming log_softmax, so no
    second [b,t,v] array is materialised. Masked targets may hold padding ids such as
    -100; they are replaced by 0 before the gather so they cannot fill in NaNs."""
    logits = logits.astype(jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    safe = jnp.where(mask != 0, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(mask != 0, logp * mask, 0.0), axis=-1)


def _margin(chosen, rejected, ref_chosen, ref_rejected):
    """Δ: how much more the policy prefers chosen over rejected than the reference does."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def _smoothed_nll(z, eps):
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss on a label flipped w.p. ε."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _length(n):
    """Token counts as float32, clamped to ≥ 1 so an empty completion cannot divide by 0."""
    return jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """DPO: −log σ(βΔ)."""
    return -jax.nn.log_sigmoid(beta * _margin(chosen, rejected, ref_chosen, ref_rejected))


def cdpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, eps):
    """Conservative DPO: DPO against labels assumed flipped with probability ε."""
    return _smoothed_nll(beta * _margin(chosen, rejected, ref_chosen, ref_rejected), eps)


def robust_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, eps):
    """rDPO: (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1−2ε), an unbiased estimate of the clean-
    label DPO loss when labels flip w.p. ε; the 1/(1−2ε) blows up as ε → 0.5."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust_dpo_loss: eps={eps} must lie in [0, 0.5); "
                         "lower eps (the assumed label-flip rate)")
    z = beta * _margin(chosen, rejected, ref_chosen, ref_rejected)
    flipped = jax.nn.log_sigmoid(-z)
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * flipped) / (1.0 - 2.0 * eps)


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """SLiC-style hinge: relu(1 − βΔ); zero once the margin exceeds 1/β."""
    return jax.nn.relu(1.0 - beta * _margin(chosen, rejected, ref_chosen, ref_rejected))


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, chosen_len, rejected_len):
    """IPO (eq. 17, τ = β): squared distance of the per-token margin from 1/(2β).

    The log-ratios are divided by completion length, as TRL does (confirmed with the IPO
    authors): summed log-ratios would make the squared loss scale with length."""
    per_token = ((chosen - ref_chosen) / _length(chosen_len)
                 - (rejected - ref_rejected) / _length(rejected_len))
    return (per_token - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen, rejected, *, beta, gamma, chosen_len, rejected_len, eps=0.0):
    """SimPO: reference-free, on length-averaged log-probs a, with target margin γ:
    −(1−ε)·log σ(βa − γ) − ε·log σ(−(βa − γ)). ε is SimPO's (cDPO-style) label smoothing."""
    a = chosen / _length(chosen_len) - rejected / _length(rejected_len)
    return _smoothed_nll(beta * a - gamma, eps)


def _log1mexp(x):
    """log(1 − eˣ) for x ≤ 0, branching at −ln 2 (Mächler 2012) to avoid cancellation.

    Each branch sees an input clamped to its own side so the unused branch cannot produce
    inf, whose 0·inf would turn jnp.where's gradient into NaN."""
    t = -math.log(2.0)
    far = jnp.log1p(-jnp.exp(jnp.minimum(x, t)))
    near = jnp.log(-jnp.expm1(jnp.maximum(x, t)))
    return jnp.where(x < t, far, near)


def orpo_loss(chosen, rejected, *, beta, chosen_len, rejected_len):
    """ORPO's odds-ratio term: −β·log σ(log odds(chosen) − log odds(rejected)), where
    odds(y) = p/(1−p) of the length-averaged log-prob p.

    This is only the preference half: the full ORPO loss is the SFT negative log-likelihood
    of the chosen completion plus this term, and the trainer adds that NLL."""
    p_c = chosen / _length(chosen_len)
    p_r = rejected / _length(rejected_len)
    log_odds = (p_c - p_r) - (_log1mexp(p_c) - _log1mexp(p_r))
    return -beta * jax.nn.log_sigmoid(log_odds)


def rewards(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """DPO's implicit rewards β·(policy − reference) for chosen and rejected, as TRL logs
    them (rewards/chosen, rewards/rejected); gradients are stopped as they are metrics."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)


def _check_inputs(name, ref_chosen, ref_rejected, chosen_len, rejected_len):
    if name not in LOSSES:
        raise ValueError(f"preference loss name={name!r} is unknown; choose one of {LOSSES}")
    if name not in REFERENCE_FREE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"preference loss {name!r} needs ref_chosen and ref_rejected; compute "
                         f"the reference model's log-probs or pick one of {REFERENCE_FREE}")
    if name in ("ipo", *REFERENCE_FREE) and (chosen_len is None or rejected_len is None):
        raise ValueError(f"preference loss {name!r} needs chosen_len and rejected_len; pass the "
                         "number of completion tokens per sequence")


def preference_loss(name, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
                    *, beta, eps=0.0, gamma=0.5):
    """Per-pair loss [b] for the loss called `name` (one of LOSSES). `eps` is cdpo's/
    simpo's label smoothing or robust's flip rate; `gamma` is SimPO's margin."""
    _check_inputs(name, ref_chosen, ref_rejected, chosen_len, rejected_len)
    lens = dict(chosen_len=chosen_len, rejected_len=rejected_len)
    if name == "simpo":
        return simpo_loss(chosen, rejected, beta=beta, gamma=gamma, eps=eps, **lens)
    if name == "orpo":
        return orpo_loss(chosen, rejected, beta=beta, **lens)
    logps = (chosen, rejected, ref_chosen, ref_rejected)
    if name == "dpo":
        return dpo_loss(*logps, beta=beta)
    if name == "cdpo":
        return cdpo_loss(*logps, beta=beta, eps=eps)
    if name == "robust":
        return robust_dpo_loss(*logps, beta=beta, eps=eps)
    if name == "hinge":
        return hinge_loss(*logps, beta=beta)
    return ipo_loss(*logps, beta=beta, **lens)
