"""What the user sees: the progress bar, metrics.jsonl, loss.png, and the speed figures
(tokens/s and MFU against a matmul peak measured on this machine, in this process)."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


def measure_matmul_peak(dtype="float32", n: int | None = None, reps: int = 3) -> float:
    """FLOP/s of the best of `reps` square matmuls of size n on the default device; the
    denominator of MFU, so figures are honest about the machine they ran on."""
    on_cpu = jax.default_backend() == "cpu"
    n = n or (2048 if on_cpu else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl. A resumed run first drops
    the lines written after its checkpoint, so the file reads as one clean run."""

    def __init__(self, run_dir: str, resume_step: int | None):
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(run_dir: str) -> str | None:
    """loss.png: training loss per logged step and validation loss per evaluation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; a run never fails for it
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    dpo = any("rewards/accuracies" in r for r in records)
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(12 if dpo else 7, 4))
    ax = axes[0] if dpo else axes
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("preference loss" if dpo else "cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    if dpo:
        _plot_rewards(axes[1], records)
    path = os.path.join(run_dir, PLOT_FILE)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_rewards(ax, records) -> None:
    """DPO's second panel: reward accuracy (train and held out) and the reward margin."""
    for key, style, label in (("rewards/accuracies", "-", "train reward accuracy"),
                              ("val_rewards/accuracies", "o-", "held-out reward accuracy")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    margin = [(r["step"], r["rewards/margins"]) for r in records if "rewards/margins" in r]
    if margin:
        twin = ax.twinx()
        twin.plot(*zip(*margin), color="tab:red", lw=1, label="train reward margin")
        twin.set_ylabel("reward margin")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")


class Progress:
    """A tqdm bar with loss, tokens/s and MFU, or plain lines (progress=False), or
    nothing at all (quiet: the other processes of a multi-host run)."""

    def __init__(self, enabled: bool, total: int, initial: int, quiet: bool = False):
        self.bar, self.quiet = None, quiet
        enabled = enabled and not quiet
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Tokens/s and MFU over the timed steps (evaluation and checkpoint pauses excluded;
    the first step, which compiles, is never timed)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens, self.fpt, self.peak = tokens_per_step, flops_per_token, peak
        self.seconds, self.steps, self.seen = 0.0, 0, 0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if self.seen > 1:
            self.seconds += seconds
            self.steps += 1

    def rates(self) -> tuple[float, float]:
        if not self.steps:
            return 0.0, 0.0
        tps = self.steps * self.tokens / self.seconds
        return tps, tps * self.fpt / self.peak
