"""The trainer end to end, in subprocesses: a run killed with SIGKILL mid-way and
resumed ends bitwise equal to an uninterrupted one (a DeepSeek-V3-style MoE, so its
router biases too); artifacts; export; one-line errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from flax import nnx

from jaxlm.model.io.runs import load_run, params_of

TRAIN = ["--seq_len", "32", "--batch_size", "2", "--grad_accum", "2", "--steps", "12",
         "--warmup_steps", "2", "--checkpoint_every", "3", "--keep", "2", "--eval_every", "6",
         "--eval_batches", "1", "--log_every", "1", "--sample_tokens", "0",
         "--progress", "false", "--plot", "false"]
ARGS = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_dim", "64", *TRAIN]
# DeepSeek-V3 in miniature: MLA, one dense layer then one MoE layer with 8 experts, a
# sigmoid router with group-limited selection and a selection bias moved every step.
MOE_ARGS = ["--preset", "deepseek-v3-small", "--model.d_model", "32", "--model.n_layers", "2",
            "--model.n_heads", "4", "--model.ffn_dim", "64", "--model.moe_ffn_dim", "16",
            "--model.q_lora_rank", "16", "--model.kv_lora_rank", "16",
            "--model.qk_nope_head_dim", "8", "--model.qk_rope_head_dim", "8",
            "--model.v_head_dim", "8", *TRAIN]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of small text files (several documents per window)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (root / f"m{i:02d}.py").write_text(textwrap.dedent(f"""
            def f{i}(x, y={i}):
                return x * y + {i * 7} if x else None
            """) * (1 + i % 4))
    return str(root)


_ENV = {"JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One compilation cache shared by this module's runs (none left in the home folder)."""
    _ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla"))
    yield
    _ENV.pop("JAX_COMPILATION_CACHE_DIR")


def _train(args, env=None, **popen):
    env = {**os.environ, **_ENV, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "jaxlm.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finished_steps(run):
    folder = os.path.join(run, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _params(run):
    lm, _, step = load_run(run)
    return jax.tree.map(np.asarray, params_of(lm)), step


def _variables(run):
    """Every variable load_run gives (parameters and router biases), and the step."""
    lm, _, step = load_run(run)
    return jax.tree.map(np.asarray, nnx.state(lm).to_pure_dict()), step


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, corpus):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    common = MOE_ARGS + ["--corpus", corpus]
    # The reference run also shows what a user gets: plot, sample, the follow-up command.
    # It runs first and alone, so the two runs after it find its programs compiled.
    ref = _train(common + ["--run_dir", full, "--plot", "true", "--sample_tokens", "8"])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    for name in ("run.json", "metrics.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(full, name)), name
    assert "validation loss" in out and "perplexity" in out and "sample:" in out
    assert f"python -m jaxlm.infer --checkpoint {full}" in out

    # Slowed down so the kill lands mid-run: after step 6's checkpoint, before step 12.
    victim = _train(common + ["--run_dir", killed], env={"JAXLM_TRAIN_STEP_SLEEP": "0.4"})
    deadline = time.time() + 240
    while max(_finished_steps(killed), default=0) < 6:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert 6 <= max(_finished_steps(killed)) < 12  # really mid-way

    resumed = _train(common + ["--run_dir", killed, "--resume"])
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming at step" in out

    (a, sa), (b, sb) = _variables(full), _variables(killed)  # load_run: what inference reads
    assert sa == sb == 12
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    bias = b["blocks"][1]["mlp"]["router_bias"]  # [1 MoE layer, 8 experts]
    assert bias.shape == (1, 8) and np.any(bias != 0)  # it moved, was saved and restored
    assert len(_finished_steps(full)) == 2  # --keep 2
    _exported_bias_is_the_trained_one(killed, bias, tmp_path / "hf")

    # The metrics file of the resumed run reads like the uninterrupted one.
    def losses(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    assert losses(full) == losses(killed)

    # Resuming with a different model or data setting is refused in one line.
    bad = _train(common + ["--run_dir", killed, "--resume", "--steps", "14",
                           "--model.d_model", "64"])
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and err.strip().count("\n") == 0
    assert "--model.d_model" in err and "d_model=32" in err


def _exported_bias_is_the_trained_one(run, bias, out):
    """to_hf writes the trained bias as DeepSeek-V3's e_score_correction_bias."""
    from safetensors.numpy import load_file

    from jaxlm.model import to_hf
    to_hf(load_run(run)[0], str(out))
    tensors = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.e_score_correction_bias"],
                                  bias[0])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    run = str(tmp_path / "nan")
    args = ARGS + ["--corpus", corpus, "--run_dir", run, "--lr", "1e30", "--clip_norm", "0",
                   "--warmup_steps", "0", "--checkpoint_every", "1"]
    p = _train(args)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and ("nan" in lines[0] or "inf" in lines[0]), err
    good = _finished_steps(run)
    assert good and f"step {good[-1]}" in lines[0]
    params, _ = _params(run)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "gpt5"], "unknown preset"),
    (["--model.d_modle", "8"], "did you mean --model.d_model"),
    (["--corpus", "/no/such/corpus"], "no such file"),
])
def test_bad_input_is_one_line(argv, msg):
    p = _train(argv)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip().count("\n") == 0 and msg in err, err


def test_checkpoints_load_for_inference_including_non_param_state(tmp_path):
    """What the trainer saves, load_run reads: params and a sigmoid MoE router's selection
    bias (not a Param: an item of its own) bit for bit; the trainer's restore gives the
    same. A run saved without that item (before it existed) gets the initial bias."""
    import shutil

    import jax.numpy as jnp

    from jaxlm.model import Config
    from jaxlm.model.build import SplitModel
    from jaxlm.model.io.runs import NON_PARAMS_ITEM, write_run_file
    from jaxlm.train.checkpoint import Checkpointer
    from jaxlm.train.config import TrainConfig
    from jaxlm.train.step import init_state, make_optimizer
    cfg = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                 n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16, router="sigmoid",
                 n_shared_experts=1, max_position=64)
    model = SplitModel.create(cfg, 0)
    tcfg = TrainConfig()
    opt = make_optimizer(tcfg, model.params)
    bias = jnp.asarray([[0.5, -0.25, 0.0, 0.125]] * 2)  # [2 MoE layers, 4 experts]
    state = init_state(tcfg, cfg, model.params, opt,
                       rest={"blocks": {0: {"mlp": {"router_bias": bias}}}})
    run = str(tmp_path / "moe")
    write_run_file(run, cfg, "byte", train=tcfg.to_dict())
    ckpt = Checkpointer(run, keep=1)
    ckpt.save(state, {"next_index": 5})
    ckpt.close()
    (params, step), (loaded, _) = _params(run), _variables(run)
    assert step == 0
    chex.assert_trees_all_equal(params, jax.tree.map(np.asarray, state.params))
    np.testing.assert_array_equal(loaded["blocks"][0]["mlp"]["router_bias"], bias)
    ckpt = Checkpointer(run, keep=1)
    back, data = ckpt.restore(init_state(tcfg, cfg, model.params, opt))
    ckpt.close()
    chex.assert_trees_all_equal(back, state)
    assert data == {"next_index": 5}
    lm, _, _ = load_run(run)
    assert np.isfinite(np.asarray(lm(np.zeros((1, 5), np.int32)).logits)).all()

    shutil.rmtree(os.path.join(run, "checkpoints", "0", NON_PARAMS_ITEM))
    old, _ = _variables(run)
    assert not np.any(old["blocks"][0]["mlp"]["router_bias"])
