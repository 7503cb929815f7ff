"""Training adapters: only the adapter is trainable (optimizer state, gradients, checkpoints),
step 0 is the base model, each method learns; the CLI fine-tunes a jaxlm run or an HF
directory with --init/--peft, survives SIGKILL + --resume bitwise (LoRA dropout on), writes
RUN/peft/ that PEFT loads on the transformers base, and refuses bad input in one line."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.model import Config, create, from_hf, load_peft, preset, to_hf
from jaxlm.model import peft as P
from jaxlm.model.build import SplitModel
from jaxlm.model.io.runs import PARAMS_ITEM, load_run
from jaxlm.train.cli import main as train_main
from jaxlm.train.config import TrainConfig
from jaxlm.train.step import init_state, loss_and_grads, make_optimizer, make_train_step

CFG = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
             init_std=0.2, max_position=64)
LORA = P.LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


def _batch(b=4, t=16, seed=0, learnable=False):
    """Random tokens, or (learnable) rows counting up in steps of 5 from a random start."""
    rng = np.random.default_rng(seed)
    if learnable:
        x = (rng.integers(0, CFG.vocab_size, (1, b, 1)) + 5 * np.arange(t + 1)) % CFG.vocab_size
    else:
        x = rng.integers(0, CFG.vocab_size, size=(1, b, t + 1))
    return {"inputs": jnp.asarray(x[..., :-1], jnp.int32),
            "targets": jnp.asarray(x[..., 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
            "segment_ids": jnp.zeros((1, b, t), jnp.int32),
            "loss_mask": jnp.ones((1, b, t), bool)}


def _size(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _adapter_run(spec, **train):
    tcfg = TrainConfig(**{"steps": 20, "warmup_steps": 0, "lr": 3e-2, **train})
    lm = create(CFG, 0)
    base = jax.tree.map(np.array, nnx.state(lm).to_pure_dict())
    model = SplitModel(P.attach(lm, spec, seed=1), trainable=P.Adapter)
    opt = make_optimizer(tcfg, model.params)
    return tcfg, model, opt, init_state(tcfg, CFG, model.params, opt), base


def test_only_the_adapter_is_trained_and_step_zero_is_the_base():
    tcfg, model, opt, state, base = _adapter_run(LORA)
    adapters = nnx.state(model.merge(model.params), P.Adapter)
    n = _size(model.params)
    assert n == _size(adapters) and 0 < n < 0.2 * _size(base)
    # AdamW's two moments for the adapter alone; everything else in the state is a scalar
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * n
    # Gradients: the adapter's tree only, equal to the full model's gradient at those
    # weights (the base gets none: it is an argument, not a parameter)
    batch = _batch()
    _, grads, _ = jax.jit(lambda p, f: loss_and_grads(model, tcfg, p, batch, frozen=f))(
        state.params, model.frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)
    graph, params, rest = nnx.split(model.merge(state.params), nnx.Param, ...)

    def full_loss(p):
        out = nnx.merge(graph, p, rest)(batch["inputs"][0]).logits
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][0][..., None], -1))
    full = nnx.to_flat_state(jax.jit(jax.grad(full_loss))(params))
    by_path = dict(nnx.to_flat_state(nnx.State(grads)))
    for path, g in full:
        if path in by_path:
            np.testing.assert_allclose(by_path[path], g[...], atol=1e-6, err_msg=str(path))
    assert any(np.abs(g).max() > 1e-4 for g in jax.tree.leaves(grads))  # B's gradient
    # Step 0's loss is the base model's; steps move the adapter and never the base
    plain = SplitModel(create(CFG, 0))
    base_loss = jax.jit(lambda p: loss_and_grads(plain, tcfg, p, batch)[0])(plain.params)
    step = make_train_step(model, tcfg, opt)
    state, m = step(state, batch)
    assert abs(float(m["loss"]) - float(base_loss)) < 1e-6
    for _ in range(3):
        state, m = step(state, batch)
    for a, b in zip(jax.tree.leaves(model.frozen.to_pure_dict()), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(state.params))  # B moved off 0


@pytest.mark.parametrize("spec", [LORA, P.PrefixSpec(tokens=4, projection=True, hidden=16),
                                  P.BottleneckSpec(dim=8)], ids=["lora", "prefix", "adapter"])
def test_each_method_learns(spec):
    tcfg, model, opt, state, _ = _adapter_run(spec, lr=0.05)
    step = make_train_step(model, tcfg, opt)
    batch = _batch(seed=3, learnable=True)
    losses = []
    for _ in range(12):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 1.0 and losses == sorted(losses, reverse=True), losses


# The CLI, in subprocesses ----------------------------------------------------------------
TRAIN = ["--seq_len", "32", "--batch_size", "2", "--grad_accum", "2", "--warmup_steps", "2",
         "--eval_every", "6", "--eval_batches", "2", "--log_every", "1", "--sample_tokens", "0",
         "--progress", "false", "--plot", "false"]
BASE = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_dim", "64", "--steps", "6", "--lr", "3e-3",
        *TRAIN]
FT = ["--steps", "12", "--checkpoint_every", "3", "--keep", "2", "--lr", "3e-2", *TRAIN]
SPEC = "lora:r=4,alpha=8,targets=q_proj,k_proj,v_proj,o_proj,dropout=0.1"
_ENV = {"JAX_PLATFORMS": "cpu"}


def _text(root, name, body, n):
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"{name}{i:02d}.txt"), "w") as f:
            f.write(body(i))
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base run, fine-tuning corpus, tmp folder): a small base trained on code-like text;
    the fine-tuning text is different (prose)."""
    tmp = tmp_path_factory.mktemp("peft_train")
    _ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "xla")
    code = _text(tmp / "code", "m", lambda i: textwrap.dedent(f"""
        def f{i}(x, y={i}):
            return x * y + {i * 7} if x else None
        """) * (1 + i % 3), 30)
    prose = _text(tmp / "prose", "p", lambda i: (f"The {i}th river runs north to the sea, "
                                                 f"and the town of {i} sits on it. ") * 6, 30)
    base = str(tmp / "base")
    p = _train(BASE + ["--corpus", code, "--run_dir", base])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    yield base, prose, tmp
    _ENV.pop("JAX_COMPILATION_CACHE_DIR")


def _train(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "jaxlm.train", *args],
                            env={**os.environ, **_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(run):
    folder = os.path.join(run, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(
        folder) else []


def test_lora_run_resumes_bitwise_and_holds_the_adapter_only(setup):
    base, prose, tmp = setup
    full, killed = str(tmp / "full"), str(tmp / "killed")
    common = ["--init", base, "--peft", SPEC, "--corpus", prose, *FT]
    ref = _train(common + ["--run_dir", full])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    base_val = float(out.split("base model's validation loss ")[1].split()[0])
    val = float(out.split("\nvalidation loss ")[1].split(",")[0])
    assert val < base_val - 0.05, (base_val, val)   # it learned the new text

    victim = _train(common + ["--run_dir", killed], env={"JAXLM_TRAIN_STEP_SLEEP": "0.4"})
    deadline = time.time() + 240
    while max(_steps(killed), default=0) < 6:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 6 <= max(_steps(killed)) < 12
    resumed = _train(["--run_dir", killed, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming at step" in out

    (a, _, sa), (b, _, sb) = load_run(full), load_run(killed)
    assert sa == sb == 12
    for x, y in zip(jax.tree.leaves(nnx.state(a, P.Adapter)),
                    jax.tree.leaves(nnx.state(b, P.Adapter))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with open(os.path.join(full, "peft", name), "rb") as f1, \
                open(os.path.join(killed, "peft", name), "rb") as f2:
            assert f1.read() == f2.read(), name

    # The checkpoint holds the adapter and run.json the base's place and content hash
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(os.path.join(full, "checkpoints", "12",
                                                            PARAMS_ITEM))
    stored = jax.tree_util.tree_flatten_with_path(getattr(meta, "item_metadata", meta))[0]
    assert stored and all("lora" in jax.tree_util.keystr(k) for k, _ in stored)
    assert sum(int(np.prod(v.shape)) for _, v in stored) == _size(nnx.state(a, P.Adapter))
    meta = json.load(open(os.path.join(full, "run.json")))
    assert meta["base"]["path"] == base and meta["base"]["kind"] == "run"
    assert len(meta["base"]["sha256"]) == 64 and meta["peft"]["method"] == "lora"

    # RUN/peft (PEFT's format) on the base = the run as load_run gives it = the engine's
    tokens = np.arange(1, 20, dtype=np.int32)[None]
    base_lm = load_run(base)[0]
    want = np.asarray(a(tokens).logits)
    np.testing.assert_allclose(np.asarray(load_peft(base_lm, os.path.join(full, "peft"))(
        tokens).logits), want, atol=1e-6)
    from jaxlm.infer import Engine
    out_ids, = Engine(a).generate([list(range(1, 9))], max_new_tokens=5)
    from jaxlm.infer.cli import main as infer_main
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert infer_main(["--checkpoint", full, "--prompt-ids", "1,2,3,4,5,6,7,8",
                           "--max-new-tokens", "5"]) == 0
    assert buf.getvalue() == load_run(full)[1].decode(out_ids) + "\n"
    # ... and on a mesh: the adapter is restored into its shards beside the base's (it
    # was restored whole on one device, and the engine refused the mixed placement)
    r = subprocess.run([sys.executable, "-m", "jaxlm.infer", "--checkpoint", full,
                        "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "5",
                        "--mesh", "tensor=2"], capture_output=True, text=True, timeout=300,
                       env={**os.environ,
                            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert r.returncode == 0 and r.stdout == buf.getvalue(), r.stderr[-2000:]

    # A base whose content changed since is refused on resume, in one line
    with open(os.path.join(base, "run.json")) as f:
        text = f.read()
    try:
        with open(os.path.join(base, "run.json"), "w") as f:
            f.write(text.replace("{", '{"edited": 1, ', 1))
        bad = _train(["--run_dir", killed, "--resume", "--steps", "14"])
        _, err = bad.communicate(timeout=120)
        assert bad.returncode == 2 and err.strip().count("\n") == 0, err
        assert "changed since this adapter was trained" in err
    finally:
        with open(os.path.join(base, "run.json"), "w") as f:
            f.write(text)


def _hf_base(tmp, cfg, name):
    """An HF directory (config.json, model.safetensors, tokenizer.json) of a random cfg."""
    from jaxlm.train.data import make_tokenizer
    path = str(tmp / name)
    tok, _ = make_tokenizer("bpe:300", ["the river runs north to the sea " * 20,
                                        "def f(x): return x"], path)
    cfg = cfg.replace(vocab_size=tok.vocab_size)
    to_hf(create(cfg, 0), path)
    return path


def test_prefix_run_from_an_hf_directory_loads_in_peft(setup):
    torch = pytest.importorskip("torch")
    peft_lib = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    _, prose, tmp = setup
    hf = _hf_base(tmp, CFG.replace(init_std=0.1), "hf_llama")
    run = str(tmp / "prefix")
    p = _train(["--init", hf, "--peft", "prefix:tokens=4,projection=true,hidden=16",
                "--corpus", prose, "--run_dir", run, *FT[:1], "4", *FT[2:]])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "base validation loss" in out
    lm, tok, _ = load_run(run)
    assert tok.vocab_size == lm.cfg.vocab_size
    model = peft_lib.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager"),
        os.path.join(run, "peft")).eval()
    tokens = np.asarray(tok.encode("the river runs"), np.int32)[None]
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    ours = np.asarray(lm(tokens).logits)
    hf_lm = from_hf(hf)
    assert np.abs(ours - np.asarray(hf_lm(tokens).logits)).max() > 1e-3   # the prefix acts
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    # --init without --peft fine-tunes every weight of the base: a run of its own
    whole = str(tmp / "whole")
    p = _train(["--init", hf, "--corpus", prose, "--run_dir", whole, "--steps", "2",
                *FT[2:]])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    tuned, _, _ = load_run(whole)
    assert not P.adapters_of(tuned) and tuned.cfg == hf_lm.cfg
    before = nnx.state(hf_lm, nnx.Param).to_pure_dict()
    after = nnx.state(tuned, nnx.Param).to_pure_dict()
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(after))]
    assert all(moved), "every parameter of a full fine-tune changes"
    assert json.load(open(os.path.join(whole, "run.json")))["base"]["kind"] == "hf"


def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXLM_COMPILATION_CACHE", "0")   # in-process: leave jax's config
    base, prose, tmp = setup
    mla = _hf_base(tmp, preset("deepseek-v3-small", d_model=32, n_layers=2, n_experts=4,
                               n_experts_per_tok=2, moe_ffn_dim=16, ffn_dim=32,
                               q_lora_rank=16, kv_lora_rank=16, n_group=1, topk_group=1),
                   "hf_mla")
    os.makedirs(tmp_path / "empty")
    adapter_run = tmp_path / "adapter_run"      # what a --peft run's run.json says
    os.makedirs(adapter_run)
    meta = json.load(open(os.path.join(base, "run.json")))
    json.dump({**meta, "peft": P.spec_to_dict(LORA)}, open(adapter_run / "run.json", "w"))
    cases = [
        (["--peft", "lora:r=4"], "add --init PATH"),
        (["--init", base, "--peft", "lora:r=0"], "r must be >= 1"),
        (["--init", base, "--peft", "lorra:r=4"], "unknown method 'lorra'"),
        (["--init", base, "--peft", "lora:targets=qq_proj"], "match no module"),
        (["--init", str(tmp_path / "empty"), "--peft", SPEC], "neither a Hugging Face model"),
        (["--init", base, "--model.d_model", "64"], "--model.d_model cannot be set with --init"),
        (["--init", base, "--preset", "tiny"], "--preset cannot be set with --init"),
        (["--init", mla, "--peft", "prefix:tokens=4"], "MLA"),
        (["--init", str(adapter_run), "--peft", SPEC], "is itself an adapter run"),
    ]
    for argv, match in cases:
        run = str(tmp_path / "run")
        assert train_main(argv + ["--corpus", prose, "--run_dir", run]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and match in err, (argv, err)
        assert not os.path.exists(run), argv
