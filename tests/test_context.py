"""Context parallelism (jaxlm.model.context, ops/ring.py through the model): a train step
and the engine's prefill on meshes with a 'sequence' axis equal one device; the zigzag
order balances causal work; bad layouts are refused in one line. The op itself against
ops.attention: tests/test_ring.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.model.context import zigzag_order
from jaxlm.train.config import TrainConfig

HERE = os.path.dirname(__file__)


def test_train_step_and_prefill_on_a_sequence_axis_equal_one_device():
    """8 emulated devices: sequence=4, data=2 × sequence=4, fsdp=2 × sequence=2 ×
    tensor=2 (dense GQA, packed documents, a sliding-window layer), the all-gather
    variant in the contiguous order, MLA, and MoE with an expert axis: loss, gradient norm
    and updated parameters within 1e-5 of one device. The engine's prefill over the
    sequence axis (dense and MLA): greedy tokens equal, logits within 1e-5."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "context_step.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report.pop("mtp_refused")
    assert len(report) == 6
    for case, r in report.items():
        assert r["loss"] <= 1e-5 and r["grad_norm"] <= 1e-5 and r["params"] <= 1e-5, (case, r)
        if "tokens_equal" in r:
            assert r["tokens_equal"] and r["logits"] <= 1e-5, (case, r)
        if "prefix_cache" in r:   # prompts prefilled after a cached prefix
            p = r.pop("prefix_cache")
            assert p["used"] and p["tokens_equal"] and p["logits"] <= 1e-5, (case, p)
        # the ring passes K/V blocks device to device; the other variant gathers them
        ring = " ring " in case
        assert r["collective_permute"] == ring and r["all_gather"] == (not ring), (case, r)


def causal_work(order, n):
    """Visible (query, key) pairs of each device's block under a causal mask."""
    per_device = order.reshape(n, -1)
    return np.array([sum(int(q) + 1 for q in block) for block in per_device])


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_order_gives_every_device_the_same_causal_work(n):
    t = 16 * n
    zig, plain = zigzag_order(t, n), zigzag_order(t, n, "contiguous")
    assert sorted(zig) == list(range(t)) and list(plain) == list(range(t))
    assert list(zig.reshape(n, -1)[0][:8]) == list(range(8))          # chunk 0 ...
    assert list(zig.reshape(n, -1)[0][8:]) == list(range(t - 8, t))  # ... and chunk 2n-1
    work = causal_work(zig, n)
    assert np.all(work == work[0])
    # the plain split: the last device does about (2n-1)/n times the mean
    plain_work = causal_work(plain, n)
    assert plain_work.argmax() == n - 1
    np.testing.assert_allclose(plain_work.max() / plain_work.mean(), (2 * n - 1) / n,
                               rtol=0.02)


def test_layouts_that_do_not_split_are_refused_in_one_line():
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_order(12, 4)
    with pytest.raises(ValueError, match=r"--seq_len 12 .*multiple of 8"):
        TrainConfig(mesh="sequence=4", seq_len=12)
    with pytest.raises(ValueError, match=r"--seq_len 6 .*multiple of 4"):
        TrainConfig(mesh="data=2,sequence=4", seq_len=6, sequence_order="contiguous")
    with pytest.raises(ValueError, match="--sequence_order: 'striped'"):
        TrainConfig(mesh="sequence=2", sequence_order="striped")
    TrainConfig(mesh="sequence=4", seq_len=16)   # fine
