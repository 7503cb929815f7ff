"""DPO training: sequence log-probs equal transformers' on padded pairs with prompts of
different lengths; the three reference sources (precomputed, a frozen copy, the adapter
switched off) agree; the step's loss is the mean over the step's pairs whatever the
accumulation, ORPO adds the chosen answers' per-token NLL; and a few steps move the
rewards the right way."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import Config, create, from_hf
from jaxlm.model import peft as P
from jaxlm.model.build import SplitModel
from jaxlm.train import preference as PR
from jaxlm.train.config import TrainConfig
from jaxlm.train.step import init_state, loss_and_grads, make_optimizer, make_train_step

CFG = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
             init_std=0.2, max_position=64)
LORA = P.LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


def _pairs(n, vocab, t=24, seed=0):
    """n random pairs: a shared prompt of 2..9 tokens, completions of 2..10 tokens."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 2, t + 1), np.int32)
    mask = np.zeros((n, 2, t + 1), bool)
    for i in range(n):
        prompt = rng.integers(1, vocab, rng.integers(2, 10))
        for j in range(2):
            answer = rng.integers(1, vocab, rng.integers(2, 11))
            seq = np.concatenate([prompt, answer])
            tokens[i, j, :len(seq)] = seq
            mask[i, j, len(prompt):len(seq)] = True
    return PR.PairSet(tokens, mask, np.arange(n))


def _batch(pairs, accum=1):
    items = {"tokens": pairs.tokens, "mask": pairs.mask,
             "ref": pairs.ref if pairs.ref is not None else np.zeros((len(pairs), 2), np.float32)}
    return jax.tree.map(jnp.asarray, PR.model_batch(items, accum))


def _plain_logps(lm, pairs):
    """[n, 2] log-probs by a log-softmax and a gather done by hand in numpy."""
    rows = pairs.tokens.reshape(-1, pairs.tokens.shape[-1])
    logits = np.asarray(jax.jit(lambda x: lm(x)[0])(jnp.asarray(rows[:, :-1])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    hit = np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]
    mask = pairs.mask.reshape(rows.shape)[:, 1:]
    return (hit * mask).sum(-1).reshape(-1, 2)


def test_sequence_logps_of_an_hf_model_equal_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        max_position_embeddings=128, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    pairs = _pairs(4, 97, seed=1)
    want = np.zeros((4, 2))
    with torch.no_grad():
        for i in range(4):
            for j in range(2):
                n = int(np.nonzero(pairs.tokens[i, j])[0].max()) + 1
                seq = torch.tensor(pairs.tokens[i, j, :n], dtype=torch.long)[None]
                logp = torch.log_softmax(hf(seq).logits[0, :-1].double(), -1)
                hit = logp[torch.arange(n - 1), seq[0, 1:]].numpy()
                want[i, j] = hit[pairs.mask[i, j, 1:n]].sum()
    model = SplitModel(from_hf(str(tmp_path)))
    tcfg = TrainConfig(task="dpo", init="x", data="x", loss="simpo")  # reference-free
    obj = PR.PreferenceObjective(tcfg, "precomputed")
    mb = jax.tree.map(lambda x: x[0], _batch(pairs))
    _, stats, _, _ = jax.jit(lambda p, b: obj.pair_terms(model, p, b, None, None, None, None))(
        model.params, mb)
    got = np.stack([stats["logps/chosen"], stats["logps/rejected"]], 1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _perturbed(model, seed=3):
    """The adapter's weights moved off their (B = 0) start, so adapter on ≠ off."""
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("spec", [LORA, P.PrefixSpec(tokens=3)], ids=["lora", "prefix"])
def test_precomputed_copy_and_adapter_off_references_agree(tmp_path, spec):
    base = create(CFG, 0)
    pairs = _pairs(6, CFG.vocab_size, seed=2)
    want = _plain_logps(base, pairs)                     # the base, run plainly
    model = SplitModel(P.attach(create(CFG, 0), spec, seed=1), trainable=P.Adapter)
    params = _perturbed(model)
    tcfg = TrainConfig(task="dpo", init="x", data="x", peft="lora:r=4")
    mb = jax.tree.map(lambda x: x[0], _batch(pairs))
    rest = model.rest.to_pure_dict()

    off = PR.PreferenceObjective(tcfg, "adapter_off")
    got_off = jax.jit(lambda p, b: off.reference_logps(model, b, p, rest, None, None))(
        params, mb)
    weights = (jax.tree.map(jnp.copy, params), rest,
               jax.tree.map(jnp.copy, model.frozen))
    copy = PR.PreferenceObjective(tcfg, "copy", model, weights)
    got_copy = jax.jit(lambda p, b, w: copy.reference_logps(model, b, p, rest, None, w))(
        params, mb, copy.inputs)
    PR.attach_reference(str(tmp_path), model.merge(params, adapters=False),
                        {"train": pairs}, 4, log=lambda *_: None)
    got_pre = _batch(pairs)["ref_logps"][0]
    for got in (got_off, got_copy, got_pre):
        np.testing.assert_allclose(np.asarray(got).reshape(-1, 2), want, atol=1e-5)
    policy = _plain_logps(model.merge(params), pairs)   # the adapter does change them
    assert np.abs(policy - want).max() > 1e-2
    # a resumed run reads the stored numbers back rather than recomputing them
    again = PR.PairSet(pairs.tokens, pairs.mask, pairs.lines)
    PR.attach_reference(str(tmp_path), None, {"train": again}, 4, log=lambda *_: None)
    np.testing.assert_array_equal(again.ref, pairs.ref)


def _full_ft(loss="dpo", **train):
    tcfg = TrainConfig(task="dpo", init="x", data="x", loss=loss, beta=0.5, lr=3e-3,
                       warmup_steps=0, **train)
    model = SplitModel(create(CFG, 0))
    opt = make_optimizer(tcfg, model.params)
    return tcfg, model, opt


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_step_loss_is_the_mean_over_pairs_whatever_the_accumulation(tmp_path, loss):
    tcfg, model, _ = _full_ft(loss, label_smoothing=0.0)
    pairs = _pairs(8, CFG.vocab_size, seed=4)
    ref = _plain_logps(create(CFG, 1), pairs).astype(np.float32)  # another model's
    pairs.ref = ref
    obj = PR.PreferenceObjective(tcfg, "precomputed")
    run = jax.jit(lambda p, b: loss_and_grads(model, tcfg, p, b, objective=obj))
    one_loss, one_grads, parts = run(model.params, _batch(pairs, 1))
    two_loss, two_grads, _ = run(model.params, _batch(pairs, 2))
    np.testing.assert_allclose(two_loss, one_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 two_grads, one_grads)
    pol = _plain_logps(create(CFG, 0), pairs)
    lengths = pairs.mask[..., 1:].sum(-1).astype(np.float64)
    if loss == "dpo":
        delta = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        want = np.mean(np.logaddexp(0, -0.5 * delta))            # −log σ(βΔ), by hand
    else:
        avg = pol / lengths
        log_odds = (avg[:, 0] - avg[:, 1]) - (np.log1p(-np.exp(avg[:, 0]))
                                              - np.log1p(-np.exp(avg[:, 1])))
        nll = -pol[:, 0].sum() / lengths[:, 0].sum()
        want = nll + np.mean(0.5 * np.logaddexp(0, -log_odds))   # NLL − β log σ(log odds)
    np.testing.assert_allclose(one_loss, want, rtol=1e-5)
    acc = np.mean((pol[:, 0] - ref[:, 0]) > (pol[:, 1] - ref[:, 1]))
    if loss == "dpo":
        np.testing.assert_allclose(parts["rewards/accuracies"], acc, atol=1e-6)
        np.testing.assert_allclose(parts["rewards/margins"],
                                   np.mean(0.5 * delta), rtol=1e-5)


def test_dpo_steps_raise_the_margin_and_resume_reads_the_same_batches():
    tcfg, model, opt = _full_ft("dpo", steps=6, batch_size=4)
    pairs = _pairs(16, CFG.vocab_size, seed=5)
    pairs.ref = _plain_logps(create(CFG, 0), pairs).astype(np.float32)
    obj = PR.PreferenceObjective(tcfg, "precomputed")
    step = make_train_step(model, tcfg, opt, objective=obj)
    state = init_state(tcfg, CFG, model.params, opt)
    it = PR.pair_batches(pairs, 4, 1, seed=0)
    first = None
    for i in range(6):
        state, m = step(state, next(it))
        if i == 0:
            first = m
            saved = it.get_state()
    assert float(first["loss"]) == pytest.approx(np.log(2), abs=1e-5)  # policy = reference
    assert float(m["rewards/margins"]) > 0.05 and float(m["loss"]) < np.log(2)
    again = PR.pair_batches(pairs, 4, 1, seed=0)
    again.set_state(saved)
    it2 = PR.pair_batches(pairs, 4, 1, seed=0)
    next(it2)
    np.testing.assert_array_equal(next(again)["inputs"], next(it2)["inputs"])




def test_full_fine_tune_copy_reference_and_padded_evaluation(tmp_path):
    """Full fine-tuning: the 'copy' reference (the starting weights, copied) equals the
    starting model run plainly; held-out evaluation over 5 pairs in batches of 4 (the
    last padded with weight 0) gives the mean over exactly those 5 pairs."""
    tcfg, model, opt = _full_ft("dpo")
    pairs = _pairs(5, CFG.vocab_size, seed=7)
    want = _plain_logps(create(CFG, 0), pairs)
    rest = model.rest.to_pure_dict()
    weights = (jax.tree.map(jnp.copy, model.params), rest, None)
    copy = PR.PreferenceObjective(tcfg, "copy", model, weights)
    mb = jax.tree.map(lambda x: x[0], _batch(pairs))
    moved = jax.tree.map(lambda x: x + 0.05, model.params)    # the policy has moved on
    got = jax.jit(lambda p, b, w: copy.reference_logps(model, b, p, rest, None, w))(
        moved, mb, copy.inputs)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 2), want, atol=1e-5)

    state = init_state(tcfg, CFG, moved, opt)
    policy = _plain_logps(model.merge(moved), pairs)
    out = PR.evaluate_pairs(PR.make_pair_eval(model, copy), state, PR.eval_batches(pairs, 4))
    margin = 0.5 * ((policy[:, 0] - want[:, 0]) - (policy[:, 1] - want[:, 1]))
    np.testing.assert_allclose(out["rewards/margins"], margin.mean(), rtol=1e-4)
    np.testing.assert_allclose(out["loss"], np.logaddexp(0, -margin).mean(), rtol=1e-4)
    np.testing.assert_allclose(out["likelihood_accuracy"],
                               np.mean(policy[:, 0] > policy[:, 1]), atol=1e-6)


def test_dpo_on_a_sigmoid_router_moe_moves_the_router_biases():
    """MoE under DPO: the aux losses enter the loss and the step's expert load reaches
    the aux-loss-free bias update, as in next-token training."""
    cfg = CFG.replace(n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16, router="sigmoid")
    tcfg = TrainConfig(task="dpo", init="x", data="x", lr=1e-3, warmup_steps=0,
                       router_bias_rate=0.01)
    model = SplitModel(create(cfg, 0))
    opt = make_optimizer(tcfg, model.params)
    state = init_state(tcfg, cfg, model.params, opt, rest=model.rest.to_pure_dict())
    before = jax.tree.map(np.array, state.rest)
    pairs = _pairs(4, cfg.vocab_size, seed=8)
    pairs.ref = np.zeros((4, 2), np.float32)
    step = make_train_step(model, tcfg, opt, objective=PR.PreferenceObjective(tcfg, "precomputed"))
    state, m = step(state, _batch(pairs))
    assert "load_imbalance" in m and np.isfinite(float(m["loss"]))
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(state.rest),
                                                 jax.tree.leaves(before))]
    assert max(moved) == pytest.approx(0.01, rel=1e-5)
