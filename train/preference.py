"""Preference optimisation (DPO and its variants): pair batches, reference log-probs and
the objective the train step minimises.

A pair is two sequences that share a prompt: row 2i of a micro-batch is pair i's chosen
completion, row 2i+1 its rejected one, right-padded to one length, so chosen and rejected
run in one forward pass (and a data-parallel split by rows keeps pairs together). A
sequence's log-prob is summed over its completion tokens only (the loss mask).

The reference model's log-probs come from one of three places (`--reference`):
  precomputed  once before training, by the starting model (an adapter run: its base,
               the adapter switched off), kept in RUN/reference_logps.npz and read from
               each batch — no reference forward pass during training (the default);
  copy         a frozen copy of the starting weights, run on the fly (a second copy of
               the weights, as TRL does when given a ref_model);
  adapter_off  an adapter run's own weights with the adapter switched off, on the fly: the
               base is already there, so no second copy (TRL's choice for PEFT models).
The three give the same numbers (tests/test_preference_train.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model.build import SplitModel
from jaxlm.model.peft import PeftInputs
from jaxlm.ops import preference as P

from .config import TrainConfig
from .step import LOAD, Objective, aux_loss

REFERENCE_FILE = "reference_logps.npz"


# Pair arrays and batches --------------------------------------------------------------
@dataclasses.dataclass
class PairSet:
    """Pairs as padded arrays: tokens/mask [n, 2, t+1] (chosen, rejected; mask marks the
    completion tokens), ref [n, 2] the reference's log-probs (None until computed)."""
    tokens: np.ndarray
    mask: np.ndarray
    lines: np.ndarray
    ref: np.ndarray | None = None

    def __len__(self):
        return len(self.tokens)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.mask.tobytes())
        return h.hexdigest()

    def __getitem__(self, i):   # a grain source
        ref = self.ref[i] if self.ref is not None else np.zeros(2, np.float32)
        return {"tokens": self.tokens[i], "mask": self.mask[i], "ref": ref}


def pair_length(pairs, seq_len: int) -> int:
    """Training positions per row: the longest sequence's, rounded up to a multiple of 8
    (fewer distinct shapes), at most seq_len."""
    longest = max(len(e.tokens) - 1 for p in pairs for e in (p.chosen, p.rejected))
    return min(seq_len, -(-longest // 8) * 8)


def pair_set(pairs, t: int) -> PairSet:
    """train/chat.py Pairs → a PairSet of rows t + 1 tokens long (the loader already
    refused sequences longer than that)."""
    n = len(pairs)
    tokens = np.zeros((n, 2, t + 1), np.int32)
    mask = np.zeros((n, 2, t + 1), bool)
    for i, p in enumerate(pairs):
        for j, e in enumerate((p.chosen, p.rejected)):
            tokens[i, j, :len(e.tokens)] = e.tokens
            mask[i, j, :len(e.mask)] = e.mask
    return PairSet(tokens, mask, np.array([p.line for p in pairs], np.int64))


def model_batch(items: dict, accum: int) -> dict:
    """Stacked pair items {tokens, mask [accum·b, 2, t+1], ref [accum·b, 2]} → the
    trainer's batch [accum, 2b, t]: rows alternate chosen, rejected."""
    tokens = items["tokens"].reshape(accum, -1, items["tokens"].shape[-1])
    mask = items["mask"].reshape(tokens.shape)
    a, rows, t = tokens.shape[0], tokens.shape[1], tokens.shape[2] - 1
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": mask[..., 1:],
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, rows, t)).copy(),
            # right padding under a causal mask never reaches the real tokens: one segment
            "segment_ids": np.zeros((a, rows, t), np.int32),
            "ref_logps": items["ref"].reshape(accum, -1).astype(np.float32)}


def pair_batches(pairs: PairSet, batch_size: int, accum: int, seed: int):
    """Endless [accum, 2·batch_size, t] batches in a seeded order, reshuffled each epoch; a
    grain iterator (get_state/set_state are JSON), so a resumed run reads the same."""
    if len(pairs) < batch_size * accum:
        raise ValueError(f"--data has {len(pairs)} usable pairs, fewer than one step's "
                         f"{batch_size * accum} (--batch_size × --grad_accum); lower them")
    ds = (grain.MapDataset.source(pairs).shuffle(seed=seed).repeat(None)
          .batch(batch_size * accum, drop_remainder=True)
          .map(lambda items: model_batch(items, accum)))
    return iter(ds.to_iter_dataset())


def eval_batches(pairs: PairSet, batch_size: int) -> list[dict]:
    """Every pair once, in order, [2b, t] batches (the last one padded with copies of the
    first pairs and a `weight` of 0 for them, so every batch has one shape)."""
    out = []
    for lo in range(0, len(pairs), batch_size):
        idx = np.arange(lo, lo + batch_size) % len(pairs)
        items = {k: np.stack([pairs[int(i)][k] for i in idx]) for k in ("tokens", "mask",
                                                                         "ref")}
        batch = jax.tree.map(lambda x: x[0], model_batch(items, 1))
        batch["weight"] = (np.arange(lo, lo + batch_size) < len(pairs)).astype(np.float32)
        out.append(batch)
    return out


# The objective ------------------------------------------------------------------------
class PreferenceObjective(Objective):
    """The DPO-family loss of tcfg.loss over pair batches, normalised by the step's pair
    count (and ORPO's NLL by the step's chosen-token count), with TRL's metrics.

    reference: 'precomputed' (batch["ref_logps"]), 'copy' (`ref_model` over its own
    weights, given as `inputs`), or 'adapter_off' (the policy's weights, adapter off)."""

    def __init__(self, tcfg: TrainConfig, reference: str, ref_model: SplitModel | None = None,
                 ref_weights=None):
        self.tcfg, self.reference, self.ref_model = tcfg, reference, ref_model
        self.free = tcfg.loss in P.REFERENCE_FREE
        self.inputs = ref_weights if reference == "copy" and not self.free else None

    def counts(self, cfg, batch):
        a, rows = batch["inputs"].shape[:2]
        chosen = jnp.sum(batch["loss_mask"][:, 0::2].astype(jnp.float32))
        return jnp.stack([jnp.float32(a * rows // 2), jnp.maximum(chosen, 1.0)])

    def reference_logps(self, model: SplitModel, mb, params, rest, frozen, extra):
        """[2b] reference log-probs of the micro-batch's rows (no gradient)."""
        if self.free:
            return None
        if self.reference == "precomputed":
            return mb["ref_logps"]
        if self.reference == "copy":   # an adapter run's copy is of its base: adapter off
            ref = self.ref_model.merge(*extra, adapters=self.ref_model.frozen is None)
        else:
            ref = model.merge(params, rest, frozen, adapters=False)
        logits, _, _ = ref(mb["inputs"], positions=mb["positions"],
                           segment_ids=mb["segment_ids"])
        return jax.lax.stop_gradient(
            P.sequence_logps(logits, mb["targets"], mb["loss_mask"]))

    def pair_terms(self, model, params, mb, rest, frozen, key, extra):
        """Per pair: (loss [b], metrics {name: [b]}), and the chosen rows' token NLL sum
        and the model's aux dict."""
        tcfg = self.tcfg
        lm = model.merge(params, rest, frozen)
        peft = None if key is None else PeftInputs(key=key)
        logits, _, aux = lm(mb["inputs"], positions=mb["positions"],
                            segment_ids=mb["segment_ids"], peft=peft)
        mask = mb["loss_mask"]
        logps = P.sequence_logps(logits, mb["targets"], mask)
        lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
        ref = self.reference_logps(model, mb, params, rest, frozen, extra)
        pc, pr, lc, lr = logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]
        rc, rr = (None, None) if ref is None else (ref[0::2], ref[1::2])
        loss = P.preference_loss(tcfg.loss, pc, pr, rc, rr, lc, lr, beta=tcfg.beta,
                                 eps=tcfg.label_smoothing, gamma=tcfg.simpo_gamma)
        if ref is None:   # reference-free: TRL's CPO/ORPO report β·(average log-prob)
            cr, rj = (jax.lax.stop_gradient(tcfg.beta * x / jnp.maximum(n, 1))
                      for x, n in ((pc, lc), (pr, lr)))
        else:
            cr, rj = P.rewards(pc, pr, rc, rr, beta=tcfg.beta)
        stats = {"rewards/chosen": cr, "rewards/rejected": rj, "rewards/margins": cr - rj,
                 "rewards/accuracies": (cr > rj).astype(jnp.float32),
                 "logps/chosen": jax.lax.stop_gradient(pc),
                 "logps/rejected": jax.lax.stop_gradient(pr),
                 "likelihood_accuracy": (pc > pr).astype(jnp.float32)}
        nll = -jnp.sum(pc)   # Σ over the chosen rows' answer tokens of −log p
        return loss, stats, nll, aux

    def micro_loss(self, model, tcfg, params, mb, counts, n_micro, rest, frozen, key, extra):
        loss, stats, nll, aux = self.pair_terms(model, params, mb, rest, frozen, key, extra)
        n_pairs, n_chosen = counts[0], counts[1]
        total = jnp.sum(loss) / n_pairs + aux_loss(aux, tcfg) / n_micro
        parts = {k: jnp.sum(v) / n_pairs for k, v in stats.items()}
        parts["preference_loss"] = jnp.sum(loss) / n_pairs
        if tcfg.loss == "orpo":   # ORPO = the chosen answers' SFT loss + the odds-ratio term
            total = total + nll / n_chosen
            parts["nll"] = nll / n_chosen
        # the loop's "ce" column: the chosen answers' per-token NLL
        parts["ce"] = nll / n_chosen
        if LOAD in aux:   # a sigmoid router's expert load, for aux-loss-free balancing
            parts[LOAD] = aux[LOAD] / n_micro
        return total, parts


def make_pair_eval(model: SplitModel, objective: PreferenceObjective):
    """Jitted (state, [2b, t] batch) → weighted sums over the batch's pairs of the loss and
    every metric, and the weight (pairs counted)."""
    def evaluate(state, batch, frozen, extra):
        loss, stats, _, _ = objective.pair_terms(model, state.params, batch, state.rest,
                                                 frozen, None, extra)
        w = batch["weight"]
        out = {k: jnp.sum(v * w) for k, v in stats.items()}
        out["loss"] = jnp.sum(loss * w)
        return out, jnp.sum(w)
    jitted = jax.jit(evaluate)
    return lambda state, batch: jitted(state, batch, model.frozen, objective.inputs)


def evaluate_pairs(eval_fn, state, batches) -> dict:
    """Means over every held-out pair of the loss and metrics."""
    sums, n = {}, 0.0
    for b in batches:
        out, w = eval_fn(state, b)
        for k, v in jax.device_get(out).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += float(w)
    return {k: v / max(n, 1.0) for k, v in sums.items()}


# Reference log-probs, computed once ----------------------------------------------------
def compute_reference(lm_fn, pairs: PairSet, batch_size: int) -> np.ndarray:
    """[n, 2] log-probs of every pair's chosen and rejected completions under lm_fn (a
    jitted (inputs, targets, mask, positions) → [rows] function)."""
    out = []
    for b in eval_batches(pairs, batch_size):
        logps = np.asarray(lm_fn(b["inputs"], b["targets"], b["loss_mask"], b["positions"]))
        out.append(logps.reshape(-1, 2))
    return np.concatenate(out)[:len(pairs)].astype(np.float32)


def reference_fn(lm):
    """The jitted sequence log-prob function of a (reference) model."""
    graph, state = nnx.split(lm)

    @jax.jit
    def f(state, inputs, targets, mask, positions):
        # called as the policy is (segment ids too), so at step 0 both give the same bits
        logits, _, _ = nnx.merge(graph, state)(inputs, positions=positions,
                                                segment_ids=jnp.zeros_like(inputs))
        return P.sequence_logps(logits, targets, mask)
    return lambda *a: f(state, *a)


def attach_reference(run_dir: str, lm, sets: dict[str, PairSet], batch_size: int,
                     log=print) -> None:
    """Fill each PairSet's `ref` with `lm`'s log-probs: read from RUN/reference_logps.npz
    when it was computed for these very pairs (a resumed run), else computed now and
    saved there."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    saved = dict(np.load(path)) if os.path.isfile(path) else {}
    fn = None
    for name, pairs in sets.items():
        key = f"{name}_{pairs.fingerprint()[:16]}"
        if not len(pairs):
            pairs.ref = np.zeros((0, 2), np.float32)
            continue
        if key in saved:
            pairs.ref = saved[key]
            continue
        fn = fn or reference_fn(lm)
        pairs.ref = compute_reference(fn, pairs, batch_size)
        saved[key] = pairs.ref
        log(f"reference log-probs of {len(pairs)} {name} pairs computed")
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **saved)
    os.replace(tmp, path)
