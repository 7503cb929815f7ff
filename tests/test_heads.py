"""MTP modules and Medusa heads: the forward against a NumPy reference of the same
equations, the losses against plain loops (masked within packed documents, gradients
included), DeepSeek-V3's HF layout for MTP layers, and heads-only training over a frozen
base through the trainer CLI."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlm.model import Config, create, from_hf, to_hf
from jaxlm.model.build import SplitModel, with_heads
from jaxlm.model.io.runs import load_run
from jaxlm.train.cli import main as train_main
from jaxlm.train.config import TrainConfig
from jaxlm.train.step import loss_and_grads

CFG = Config(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             init_std=0.2, mtp_depth=2, medusa_heads=3)
TOL = dict(rtol=2e-5, atol=2e-5)


def _model(seed=0):
    lm = create(CFG, seed)
    # fresh non-trivial Medusa weights (they start at zero, which would hide errors)
    for i, head in enumerate(lm.medusa):
        head.proj.kernel[...] = 0.2 * jax.random.normal(jax.random.key(10 + i), (32, 32))
        head.proj.bias[...] = 0.2 * jax.random.normal(jax.random.key(20 + i), (32,))
    return lm


def _rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _packed(seed=0, b=2, t=20):
    """Two packed documents per row (boundary at a random place), a few masked targets."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, (1, b, t + 1))
    seg = np.zeros((1, b, t), np.int32)
    pos = np.tile(np.arange(t), (1, b, 1))
    for r in range(b):
        cut = rng.integers(5, t - 5)
        seg[0, r, cut:] = 1
        pos[0, r, cut:] = np.arange(t - cut)
    mask = rng.random((1, b, t)) > 0.1
    return {"inputs": jnp.asarray(x[..., :-1]), "targets": jnp.asarray(x[..., 1:]),
            "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.asarray(mask)}


@pytest.fixture(autouse=True)
def _leave_jax_config_alone(monkeypatch):
    """The in-process trainer runs below would turn on JAX's persistent compilation cache
    for the rest of the pytest process (train.cli.use_compilation_cache); later tests that
    compile from server threads have crashed writing to it (jax 0.10.2)."""
    monkeypatch.setenv("JAXLM_COMPILATION_CACHE", "0")


def test_mtp_and_medusa_forward_match_the_equations():
    lm = _model()
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    logits, _, mtp, medusa = lm.with_heads(tokens)
    # the next-token logits are the plain forward's
    np.testing.assert_allclose(logits, lm(tokens).logits, **TOL)
    emb = np.asarray(lm.embed.embedding[...])
    head = np.asarray(lm.lm_head.kernel[...])
    # h0: the final hidden state the LM head reads (checked: it gives the logits)
    x = lm._trunk(tokens, None, None, None, None)[0]
    h = np.asarray(lm.final_hidden(x))
    np.testing.assert_allclose(h @ head, logits, **TOL)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    rope, _ = lm.position_signals(positions)
    toks = np.asarray(tokens)
    for k, module in enumerate(lm.mtp):
        ahead = np.zeros_like(toks)
        ahead[:, :12 - (k + 1)] = toks[:, k + 1:]            # token i+k+1 at position i
        e = _rms(emb[ahead], np.asarray(module.enorm.scale[...]))
        hn = _rms(h, np.asarray(module.hnorm.scale[...]))
        z = np.concatenate([e, hn], -1) @ np.asarray(module.eh_proj.kernel[...])
        h, _, _ = module.block(jnp.asarray(z), positions, rope=rope)
        h = np.asarray(h)
        want = _rms(h, np.asarray(module.head_norm.scale[...])) @ head
        np.testing.assert_allclose(mtp[k], want, rtol=1e-4, atol=1e-4)
    hf = np.asarray(lm.final_hidden(x))
    for k, m in enumerate(lm.medusa):
        w, b = np.asarray(m.proj.kernel[...]), np.asarray(m.proj.bias[...])
        z = hf @ w + b
        want = (hf + z / (1 + np.exp(-z))) @ np.asarray(m.lm_head.kernel[...])
        np.testing.assert_allclose(medusa[k], want, rtol=1e-4, atol=1e-4)


def _loop_head_loss(mtp, medusa, batch, tcfg):
    """λ/D Σ_k CE_k + Σ_k decay^k CE_k with an explicit loop over positions: the target
    k further on counts only inside the same document and where it is trained on."""
    tg, seg, mask = (np.asarray(batch[n])[0] for n in ("targets", "segment_ids", "loss_mask"))
    total = 0.0

    def ce_k(logits, k):
        picked = [(r, i, tg[r, i + k]) for r in range(tg.shape[0])
                  for i in range(tg.shape[1] - k)
                  if seg[r, i + k] == seg[r, i] and mask[r, i + k]]
        r, i, t = (np.asarray(a) for a in zip(*picked))
        return -jnp.mean(jax.nn.log_softmax(logits)[r, i, t])
    for k in range(mtp.shape[0]):
        total = total + tcfg.mtp_weight / mtp.shape[0] * ce_k(mtp[k], k + 1)
    for k in range(medusa.shape[0]):
        total = total + tcfg.medusa_decay ** (k + 1) * ce_k(medusa[k], k + 1)
    return total


def test_head_losses_and_gradients_match_a_plain_loop():
    lm = _model()
    split = SplitModel(lm)
    tcfg = TrainConfig(mtp_weight=0.4, medusa_decay=0.7)
    batch = _packed()
    mb = jax.tree.map(lambda a: a[0], batch)

    def reference(params):
        m = split.merge(params)
        logits, aux, mtp, medusa = m.with_heads(mb["inputs"], positions=mb["positions"],
                                                segment_ids=mb["segment_ids"])
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), mb["targets"][..., None], -1)
        main = jnp.sum(ce[..., 0] * mb["loss_mask"]) / jnp.sum(mb["loss_mask"])
        return main + _loop_head_loss(mtp, medusa, batch, tcfg)

    loss, grads, parts = jax.jit(lambda p: loss_and_grads(split, tcfg, p, batch))(split.params)
    want, want_grads = jax.jit(jax.value_and_grad(reference))(split.params)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert set(parts) >= {"mtp_ce/1", "mtp_ce/2", "medusa_ce/1", "medusa_ce/3"}
    for name in ("mtp", "medusa"):
        for got, ref in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(want_grads[name])):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(grads["mtp"][0]["eh_proj"]["kernel"]))) > 0


def _deepseek_cfg(depth):
    return Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
                  attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16,
                  n_shared_experts=1, router="sigmoid", first_k_dense=1,
                  rope_layout="interleaved", mtp_depth=depth, init_std=0.2)


def test_deepseek_v3_mtp_layers_import_from_the_hf_layout(tmp_path):
    """A transformers DeepSeek-V3 checkpoint plus MTP layer tensors written by hand in
    DeepSeek's layout (layer n_layers, num_nextn_predict_layers = 1) loads into jaxlm's
    MTP module, and to_hf writes the same names back."""
    import torch
    import transformers
    cfg = _deepseek_cfg(0)
    base = create(cfg, 0)
    to_hf(base, str(tmp_path / "plain"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"))
    hf.save_pretrained(str(tmp_path / "ds"))
    d, n = cfg.d_model, cfg.n_layers
    rng = np.random.default_rng(3)
    stored = load_file(str(tmp_path / "ds" / "model.safetensors"))
    mtp = {}   # the MTP layer: a whole (MoE) decoder layer copied from layer 1, perturbed
    for name, value in stored.items():
        if name.startswith("model.layers.1."):
            mtp[name.replace("layers.1.", f"layers.{n}.")] = (
                value + 0.1 * rng.standard_normal(value.shape).astype(value.dtype))
    P = f"model.layers.{n}."
    mtp[P + "enorm.weight"] = rng.random(d).astype(np.float32) + 0.5
    mtp[P + "hnorm.weight"] = rng.random(d).astype(np.float32) + 0.5
    mtp[P + "eh_proj.weight"] = rng.standard_normal((d, 2 * d)).astype(np.float32) * 0.2
    mtp[P + "shared_head.norm.weight"] = rng.random(d).astype(np.float32) + 0.5
    mtp[P + "embed_tokens.weight"] = stored["model.embed_tokens.weight"]
    mtp[P + "shared_head.head.weight"] = stored["lm_head.weight"]
    save_file(mtp, str(tmp_path / "ds" / "mtp.safetensors"))
    conf = json.loads((tmp_path / "ds" / "config.json").read_text())
    conf["num_nextn_predict_layers"] = 1
    (tmp_path / "ds" / "config.json").write_text(json.dumps(conf))
    index = tmp_path / "ds" / "model.safetensors.index.json"
    assert not index.exists()

    lm = from_hf(str(tmp_path / "ds"))
    assert lm.cfg.mtp_depth == 1
    m = lm.mtp[0]
    np.testing.assert_array_equal(m.eh_proj.kernel[...], mtp[P + "eh_proj.weight"].T)
    np.testing.assert_array_equal(m.enorm.scale[...], mtp[P + "enorm.weight"])
    np.testing.assert_array_equal(m.head_norm.scale[...], mtp[P + "shared_head.norm.weight"])
    np.testing.assert_array_equal(m.block.attn.o_proj.kernel[...].reshape(-1, d),
                                  mtp[P + "self_attn.o_proj.weight"].T)
    np.testing.assert_array_equal(m.block.mlp.gate[...][2], mtp[P + "mlp.experts.2.gate_proj.weight"].T)
    # the main model is transformers' (which ignores the MTP layer)
    ids = torch.tensor(np.random.default_rng(0).integers(0, 64, (1, 10)))
    want = hf(ids).logits.detach().numpy()
    np.testing.assert_allclose(lm(jnp.asarray(ids.numpy())).logits, want, rtol=1e-4, atol=1e-4)
    # export writes the same tensors back
    to_hf(lm, str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, value in mtp.items():
        np.testing.assert_array_equal(out[name], value, err_msg=name)
    # a duplicate that differs from the shared tensor is refused
    mtp[P + "embed_tokens.weight"] = mtp[P + "embed_tokens.weight"] + 1
    save_file(mtp, str(tmp_path / "ds" / "mtp.safetensors"))
    with pytest.raises(ValueError, match="embed_tokens.weight differs"):
        from_hf(str(tmp_path / "ds"))


def test_an_mtp_run_resumes_bitwise(tmp_path):
    """MTP parameters and their optimizer state checkpoint and resume: 6 steps straight
    equal 3 steps, then --resume to 6 (a constant learning rate, so the schedule does not
    depend on --steps)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"x{i} = {i} * {i}\n" for i in range(500)))
    common = ["--corpus", str(corpus), "--progress", "false", "--plot", "false",
              "--sample_tokens", "0", "--seq_len", "32", "--batch_size", "4",
              "--checkpoint_every", "3", "--eval_every", "100", "--mtp_depth", "2",
              "--warmup_steps", "0", "--min_lr_ratio", "1",
              "--model.d_model", "32", "--model.n_layers", "1", "--model.ffn_dim", "64",
              "--model.n_heads", "2"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    assert train_main(common + ["--steps", "6", "--run_dir", straight]) == 0
    assert train_main(common + ["--steps", "3", "--run_dir", resumed]) == 0
    assert train_main(["--resume", "--run_dir", resumed, "--steps", "6"]) == 0
    a, _, _ = load_run(straight)
    b, _, _ = load_run(resumed)
    assert a.cfg.mtp_depth == 2
    for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                              nnx.to_flat_state(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(x[...], y[...], err_msg=str(p))


def test_heads_only_run_trains_the_heads_over_a_frozen_base(tmp_path):
    """--init BASE --heads_only --medusa_heads K --mtp_depth D: the heads learn, the base's
    weights and validation loss do not move; the run loads back with its heads; bad
    combinations are refused in one line."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400)))
    common = ["--corpus", str(corpus), "--progress", "false", "--plot", "false",
              "--sample_tokens", "0", "--seq_len", "32", "--batch_size", "4"]
    small = ["--model.d_model", "32", "--model.n_layers", "1", "--model.ffn_dim", "64",
             "--model.n_heads", "2"]
    base = str(tmp_path / "base")
    assert train_main(common + small + ["--steps", "10", "--run_dir", base]) == 0
    heads = str(tmp_path / "heads")
    assert train_main(common + ["--init", base, "--heads_only", "--medusa_heads", "2",
                                "--mtp_depth", "1", "--steps", "30", "--lr", "1e-2",
                                "--eval_every", "30", "--run_dir", heads]) == 0
    rows = [json.loads(line) for line in open(os.path.join(heads, "metrics.jsonl"))]
    train_rows = [r for r in rows if "medusa_ce/1" in r]
    assert train_rows[-1]["medusa_ce/1"] < train_rows[0]["medusa_ce/1"]
    assert train_rows[-1]["mtp_ce/1"] < train_rows[0]["mtp_ce/1"]
    lm_base, _, _ = load_run(base)
    lm, _, _ = load_run(heads)
    assert (lm.cfg.medusa_heads, lm.cfg.mtp_depth) == (2, 1)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(lm_base, nnx.Param)),
                              nnx.to_flat_state(nnx.state(with_heads(lm, 0, 0), nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))
    for argv in (["--heads_only", "--medusa_heads", "2"],                 # no --init
                 ["--init", base, "--heads_only"],                         # no heads
                 ["--init", heads, "--peft", "lora:r=2,targets=q_proj"]):  # heads-only base
        assert train_main(common + argv + ["--run_dir", str(tmp_path / "x")]) == 2
        assert not os.path.exists(tmp_path / "x" / "checkpoints")
