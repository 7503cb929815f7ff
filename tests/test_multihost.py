"""Multiple hosts through JAX's own distributed runtime, for real: two processes on
localhost, gloo collectives, one global mesh.

`python -m jaxlm.train --coordinator 127.0.0.1:PORT --num_processes 2 --process_id I
--mesh ...` trains a step whose loss equals the same run in one process on one device;
the orbax checkpoint both processes wrote restores (--resume) and the continued run
still equals an uninterrupted single-process one. The default test does this with one
device per process (mesh sequence=2); the slow one with four each (data=2,fsdp=2,tensor=2),
evaluation and the end-of-run sample."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ARGS = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_dim", "64", "--seq_len", "32",
        "--batch_size", "8", "--warmup_steps", "1", "--checkpoint_every", "2",
        "--eval_every", "100", "--eval_batches", "1", "--log_every", "1",
        "--sample_tokens", "4", "--progress", "false", "--plot", "false"]
MESH = ["--mesh", "data=2,fsdp=2,tensor=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text("".join(textwrap.dedent(f"""
        def f{i}(x, y={i}):
            return x * y + {i * 7} if x else None
        """) for i in range(120)))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_COMPILATION_CACHE": "0",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def cached_env(tmp_path_factory):
    """One CPU device per process, and a compilation cache of this module's own, so a
    resumed run finds the programs its first half compiled."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla")),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, env, processes=1):
    """Start the trainer CLI as `processes` cooperating processes."""
    extra = [[]]
    if processes > 1:
        port = free_port()
        extra = [["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
                  "--process_id", str(i)] for i in range(processes)]
    return [subprocess.Popen([sys.executable, "-m", "jaxlm.train", *args, *e], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for e in extra]


def finish(procs, timeout=240):
    """Wait for launched processes; their (stdout, stderr), each run asserted to succeed."""
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append((out, err))
    return outs


def train(args, env, processes=1, timeout=240):
    """Run the trainer CLI as `processes` cooperating processes; returns their outputs."""
    return finish(launch(args, env, processes), timeout)


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_two_processes_train_like_one_and_their_checkpoint_resumes(corpus, cached_env,
                                                                   tmp_path):
    """The cheapest proof, run by default: step 1 on two processes (one device each, mesh
    sequence=2: every row split between the hosts, ring attention passing K/V blocks
    between them over gloo) has the loss of one process on one device; the checkpoint both wrote resumes
    in one process (another topology) and step 2 still equals the uninterrupted run.
    No evaluation, no sample: it compiles only what it proves. The slow test below
    resumes on the two-process mesh itself, with sharded parameters."""
    common = ["--corpus", corpus, *ARGS, "--val_fraction", "0", "--sample_tokens", "0",
              "--batch_size", "4", "--seq_len", "16", "--checkpoint_every", "1"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    # Compiling is mostly one core's work: the reference runs beside the two processes,
    # and the one-process resume then finds its step program in the cache.
    reference = launch([*common, "--steps", "2", "--run_dir", single], cached_env)
    outs = train([*common, "--mesh", "sequence=2", "--steps", "1", "--run_dir", multi],
                 cached_env, processes=2)
    finish(reference)
    assert "mesh {'sequence': 2} over 2 process(es)" in outs[0][0]
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["1"]
    out, _ = train([*common, "--steps", "2", "--run_dir", multi, "--resume", "--mesh", "",
                    "--num_processes", "1"], cached_env)[0]
    assert "resuming at step 1" in out
    got, want = losses(multi), losses(single)
    assert len(got) == len(want) == 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow  # ~55 s: three trainer runs, two of them as two processes
def test_two_processes_train_checkpoint_and_resume_like_one(corpus, env, tmp_path):
    common = ["--corpus", corpus, *ARGS]
    single = str(tmp_path / "single")
    train([*common, "--steps", "4", "--run_dir", single], env)
    multi = str(tmp_path / "multi")
    outs = train([*common, *MESH, "--steps", "2", "--run_dir", multi], env, processes=2)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 2 process(es)" in outs[0][0]
    # Only the first process reports. (The other's stdout holds gloo's connection lines,
    # which its threads may interleave mid-line, so look for what the trainer prints.)
    for ours in ("run ", "trained", "validation", "sample:", "continue with"):
        assert ours not in outs[1][0], ours
    assert "sample:" in outs[0][0]
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2"]
    # Restore what both processes saved, on the same global mesh, and continue.
    train([*common, *MESH, "--steps", "4", "--run_dir", multi, "--resume"], env,
          processes=2)
    got, want = losses(multi), losses(single)
    assert len(got) == len(want) == 4
    np.testing.assert_allclose(got, want, rtol=1e-5)
