"""Context parallelism: per-device memory and step time vs sequence length, sequence=1/2/4/8.

    python benchmarks/context.py               # T 1k–16k × N 1/2/4/8 (2 cores: 6–15 min)
    python benchmarks/context.py --quick       # smoke run: T 256/512 × N 1/2/4, 30–75 s
    python benchmarks/context.py --json out.json
    python benchmarks/context.py --overlap     # force the communication-overlap part on CPU

One train step (AdamW, grad_accum 1, batch 1, remat="full") of a small Llama-like model
(d_model 256, 4 layers, 8 query / 2 KV heads, vocab 256, float32) on a mesh
`sequence=N`; the anchor is N=1, one device running ordinary attention, and every
figure for N > 1 is printed next to the N=1 figure with their ratio. On a CPU the script
emulates 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax
is imported unless XLA_FLAGS already names a device count).

Measured:
  * memory: XLA's memory_analysis() of the COMPILED step, per device (the SPMD program is
    one device's program): arguments + outputs + temporaries − donated aliases, and the
    temporaries alone (activations, attention blocks, gradients in flight; the arguments
    are the replicated parameters and AdamW moments, the same on every device). Compile
    only, nothing runs, so 16k tokens on 8 emulated devices fit in a small machine.
    If memory per device depends on T/N alone, rows of equal T/N have equal temp (the
    "T/N = ..." verdict lines give the spread across N); if it is linear in T/N, the
    marginal temp per extra local token is constant as T grows at fixed N (the "N=..."
    lines; it doubles per doubling of T when a (T/N)² term dominates).
  * step time: one step per row in --rounds interleaved rounds after a warm-up step, the
    fastest round (and the median), for T <= --time-max. Emulated CPU devices share the
    host's cores, so this is the TOTAL work of all devices plus the collectives' overhead,
    not a parallel speed-up, and load imbalance between devices barely shows; the zigzag
    vs contiguous rows therefore also print the busiest device's causal sub-block pairs
    (counted from the layout and ops.ring's sub-blocks): on real devices a step waits for it.
  * ring vs all-gather (Config.context_parallel) and zigzag vs contiguous
    (TrainConfig.sequence_order) at one size (--variant-seq, --variant-n).
  * communication hidden behind compute (on a GPU/TPU with >= 2 devices; skipped on a CPU
    unless --overlap): four variants of the ring step, timed alike — (a) as is; (b) the
    K/V and dK/dV ppermutes removed (positions and segment ids still travel, so every
    device skips exactly the same block pairs: the same compute, almost no bytes moved);
    (c) the per-block attention maths replaced by an O(size) stub (the same bytes moved,
    almost no attention compute); (d) both. Communication time ≈ c − d, the part of it
    exposed in the step ≈ a − b, hidden fraction = 1 − (a − b)/(c − d), clipped to [0, 1].
    The variants monkeypatch ops.ring while tracing (names _shift, _xla_block_fwd/bwd,
    _flash_block_fwd/bwd); the script prints each program's float collective-permute count
    as a check that (b) and (d) move no K/V.

--quick compiles with --xla_backend_optimization_level=0 (CPU compile time dominates a
smoke run); its timings are not figures.

Status (measured 2026-12-04 06:28 UTC on a 2-core AMD EPYC VM, jax 0.10.2, 8 emulated
devices, figures in the README): per-device memory of the ring step depends on T/N alone
(spread ≤ 1.01× across N at equal T/N) and grows linearly in it: 94.6 MiB of temporaries
at 16k tokens over 8 devices, against 45 GiB for one device running plain attention.
(Before ops.ring checkpointed each ring step's forward, JAX kept every step's sub-block
logits inside the model's scanned layers and memory grew as T²/N; this script found it.)
The overlap part has only run on emulated CPU devices, where its numbers mean nothing;
its GPU/TPU figures are still to be measured.
"""
from __future__ import annotations

import os
import re
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (
        os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8")))
if "--quick" in sys.argv[1:]:  # a smoke run: CPU compile time dominates, so compile cheaply
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.model import Config, sharding  # noqa: E402
from jaxlm.model.build import SplitModel  # noqa: E402
from jaxlm.model.context import zigzag_order  # noqa: E402
from jaxlm.model.sharding import make_mesh  # noqa: E402
from jaxlm.ops import ring as ring_ops  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402
from jaxlm.train.step import (init_state, make_optimizer, make_train_step,  # noqa: E402
                              sequence_layout)

from common import machine  # noqa: E402

MiB = 2 ** 20


def model_config(a) -> Config:
    return Config(vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                  n_kv_heads=a.kv_heads, ffn_dim=a.d_model * 3, max_position=max(a.seqs),
                  remat="full", dtype=a.dtype, attention_impl=a.attention_impl)


def host_batch(t: int, vocab: int) -> dict:
    """One micro-batch [1, 1, t]: one document, every target counted."""
    tok = np.random.default_rng(0).integers(0, vocab, (1, 1, t + 1))
    return {"inputs": tok[..., :-1].astype(np.int32), "targets": tok[..., 1:].astype(np.int32),
            "positions": np.arange(t, dtype=np.int32)[None, None],
            "segment_ids": np.zeros((1, 1, t), np.int32),
            "loss_mask": np.ones((1, 1, t), bool)}


MODELS: dict = {}   # (Config, variant) → SplitModel, created once on the default device


class Setup:
    """One N: a mesh `sequence=N` and a train state on it (threaded through every run,
    since the step donates it), every parameter replicated over the mesh."""

    def __init__(self, cfg: Config, n: int):
        self.cfg, self.n = cfg, n
        self.mesh = make_mesh(f"sequence={n}", jax.devices()[:n])
        self.state = None
        self.compiled = {}

    def model(self, variant):
        key = (self.cfg, variant)
        if key not in MODELS:
            MODELS[key] = SplitModel.create(self.cfg.replace(context_parallel=variant), 0)
        return MODELS[key]

    def compile(self, t: int, variant="ring"):
        """(compiled step, compile seconds). The order of the tokens is the batch's
        layout only (attention masks by the positions that travel with them), so one
        program serves both orders."""
        if (t, variant) in self.compiled:
            return self.compiled[t, variant], 0.0
        model = self.model(variant)
        tcfg = TrainConfig(steps=1000, warmup_steps=0, grad_accum=1, batch_size=1, seq_len=t,
                           lr=1e-4)
        opt = make_optimizer(tcfg, model.params)
        if self.state is None:
            params = jax.device_put(model.params, sharding.replicated(self.mesh))
            self.state = init_state(tcfg, self.cfg, params, opt, self.mesh)
        step = make_train_step(model, tcfg, opt, self.mesh)
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            compiled = step.jitted.lower(self.state, self.batch(t), None, None).compile()
        self.compiled[t, variant] = compiled
        return compiled, time.perf_counter() - start

    def batch(self, t: int, order="zigzag"):
        """The global batch as the trainer lays it out (train/step.py _on_mesh)."""
        batch, length_dim = host_batch(t, self.cfg.vocab_size), None
        if self.n > 1:
            batch, length_dim = sequence_layout(batch, self.n, 2, order), 2
        return sharding.global_batch(batch, self.mesh, 1, length_dim=length_dim)

    def step(self, compiled, gbatch) -> float:
        """Seconds of one step (the state threads through: the step donates it)."""
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            self.state, m = compiled(self.state, gbatch, None, None)
            jax.block_until_ready((self.state, m))
            secs = time.perf_counter() - start
        if not np.isfinite(float(m["loss"])):
            raise FloatingPointError(f"loss {float(m['loss'])}")
        return secs


def _error(e: Exception) -> str:
    return type(e).__name__ + ": " + (str(e).splitlines() or [""])[0][:100]


def time_rows(setups, rows, rounds: int):
    """Step time of each row in `rounds` interleaved rounds of one step each, after one
    warm-up step, so that a load change on a shared machine hits every row alike: step_s
    is the fastest round (interference only ever slows a round down), step_med_s the
    median. A row that fails here keeps its memory figures and gets time_error."""
    runs = []
    for r in rows:
        if "error" in r:
            continue
        setup = setups[r["n"]]
        try:
            compiled = setup.compile(r["t"], r["variant"])[0]
            gbatch = setup.batch(r["t"], r["order"])
            setup.step(compiled, gbatch)
            runs.append((r, setup, compiled, gbatch, []))
        except Exception as e:  # out of memory, non-finite loss: keep the sweep going
            r["time_error"] = _error(e)
    for _ in range(rounds):
        for r, setup, compiled, gbatch, times in runs:
            if "time_error" not in r:
                try:
                    times.append(setup.step(compiled, gbatch))
                except Exception as e:
                    r["time_error"] = _error(e)
    for r, *_, times in runs:
        if times and "time_error" not in r:
            r["step_s"], r["step_med_s"] = min(times), statistics.median(times)


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"arg": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes, "total": total}


def measure(setups, cfg, t, n, *, variant="ring", order="zigzag"):
    """One row: the per-device memory of the compiled step. Errors are kept in the row."""
    row = dict(t=t, n=n, variant=variant, order=order)
    try:
        if n not in setups:
            setups[n] = Setup(cfg, n)
        compiled, secs = setups[n].compile(t, variant)
        row.update(memory(compiled), compile_s=secs)
    except Exception as e:  # out of memory, too slow, unsupported: keep the sweep going
        row["error"] = _error(e)
    return row


def busiest_share(t: int, n: int, order: str) -> tuple[int, float]:
    """(the busiest device's causal sub-block pairs, its share over the mean): what
    ops.ring visits (a pair of sub-blocks is skipped when the causal mask hides it all)."""
    chunks = getattr(ring_ops, "default_chunks", lambda t, s: 2)(t // n, t // n)
    pos = zigzag_order(t, n, order).reshape(n, chunks, -1)   # [device, sub-block, tokens]
    lo, hi = pos.min(-1), pos.max(-1)
    work = [sum(int(lo[j, b] <= hi[i, a]) for j in range(n)
                for a in range(chunks) for b in range(chunks)) for i in range(n)]
    return max(work), max(work) / (sum(work) / n)


# ----------------------------------------------------------------------------- overlap

def _shift_positions_only(tree, axis_name):
    """ops.ring._shift moving only the integer leaves (positions, segment ids): every
    device sees the same masks, so it skips and computes the same block pairs."""
    n = jax.lax.axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm)
                        if jnp.issubdtype(x.dtype, jnp.integer) else x, tree)


def _cheap(*xs):
    return sum(jnp.mean(x.astype(jnp.float32)) for x in xs)


def _stub_fwd(spec, q, k, v, *rest):
    """ops.ring's per-block forward (XLA or Pallas signature) at O(size) cost: the same
    shapes, depending on k and v so the ring still moves them."""
    b, t, h, _ = q.shape
    c = _cheap(q, k, v)
    return (jnp.zeros((b, t, h, v.shape[-1]), jnp.float32) + c,
            jnp.zeros((b, h, t), jnp.float32) + c)


def _stub_bwd(spec, q, k, v, *rest):
    c = _cheap(q, k, v, rest[-1])
    return tuple(jnp.zeros(x.shape, jnp.float32) + c for x in (q, k, v))


@contextlib.contextmanager
def patched(no_comm: bool, no_attention: bool):
    """ops.ring with its K/V ppermutes and/or its block maths removed (traced anew)."""
    names = {}
    if no_comm:
        names["_shift"] = _shift_positions_only
    if no_attention:
        names.update(_xla_block_fwd=_stub_fwd, _flash_block_fwd=_stub_fwd,
                     _xla_block_bwd=_stub_bwd, _flash_block_bwd=_stub_bwd)
    saved = {k: getattr(ring_ops, k) for k in names}
    for k, f in names.items():
        setattr(ring_ops, k, f)
    jax.clear_caches()
    try:
        yield
    finally:
        for k, f in saved.items():
            setattr(ring_ops, k, f)
        jax.clear_caches()


def overlap(cfg, t, n, rounds):
    """Hidden fraction of the ring's communication (see the module docstring). The four
    variants are timed in `rounds` interleaved rounds; each keeps its fastest round."""
    setup = Setup(cfg, n)
    variants = {"a": (False, False), "b": (True, False), "c": (False, True), "d": (True, True)}
    compiled, moved = {}, {}
    for key, (no_comm, no_attn) in variants.items():
        with patched(no_comm, no_attn):
            compiled[key] = (setup.compile(t)[0], setup.batch(t))
            setup.compiled.clear()
        # float collective-permutes in the program: K/V (dK/dV) blocks; none in b and d
        moved[key] = len(re.findall(r"= (?:f32|bf16|f16)\[[^\]]*\][^ ]* collective-permute",
                                    compiled[key][0].as_text()))
    for key in variants:   # warm-up
        setup.step(*compiled[key])
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for key in variants:
            times[key].append(setup.step(*compiled[key]))
    best = {k: min(v) for k, v in times.items()}
    comm = best["c"] - best["d"]
    exposed = best["a"] - best["b"]
    hidden = None if comm <= 0 else min(1.0, max(0.0, 1.0 - exposed / comm))
    return dict(t=t, n=n, **{f"{k}_s": v for k, v in best.items()}, comm_s=comm,
                exposed_s=exposed, hidden=hidden, float_permutes=moved)


# ------------------------------------------------------------------------------ output

def sources() -> str:
    """Short hashes of the files the figures depend on most (the library is young)."""
    from jaxlm.model import context

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:8]
    return ", ".join(f"{os.path.basename(m.__file__)} {digest(m.__file__)}"
                     for m in (ring_ops, context))


def mib(x):
    return "-" if x is None else f"{x / MiB:.1f}"


def ratio(x, y):
    return "-" if not x or not y else f"{x / y:.2f}"


def print_memory(rows):
    print("\nPer-device memory of the compiled train step (memory_analysis, compile only)")
    fmt = "{:>6} {:>2} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9} {:>12}"
    print(fmt.format("T", "N", "T/N", "total MiB", "temp MiB", "args MiB", "N=1/N tot",
                     "N=1/N tmp", "temp KiB/tok"))
    base = {r["t"]: r for r in rows if r["n"] == 1 and "temp" in r}
    for r in rows:
        if "error" in r:
            print(fmt.format(r["t"], r["n"], r["t"] // r["n"], *"-" * 6), " ", r["error"])
            continue
        b = base.get(r["t"], {})
        print(fmt.format(r["t"], r["n"], r["t"] // r["n"], mib(r["total"]), mib(r["temp"]),
                         mib(r["arg"]), ratio(b.get("total"), r["total"]),
                         ratio(b.get("temp"), r["temp"]),
                         f"{r['temp'] / (r['t'] // r['n']) / 1024:.1f}"))


def memory_verdict(rows) -> list[str]:
    """Lines on how temp scales: rows of equal T/N across N, and the marginal temp per
    local token as T grows at fixed N."""
    ok = [r for r in rows if "temp" in r]
    out = []
    by_local = {}
    for r in ok:
        if r["n"] > 1:
            by_local.setdefault(r["t"] // r["n"], []).append(r)
    for local, rs in sorted(by_local.items()):
        if len(rs) > 1:
            temps = [r["temp"] for r in rs]
            out.append(f"T/N = {local}: temp {min(temps) / MiB:.1f}–{max(temps) / MiB:.1f} MiB "
                       f"over N = {', '.join(str(r['n']) for r in rs)} "
                       f"(spread {max(temps) / min(temps):.2f}×)")
    for n in sorted({r["n"] for r in ok}):
        rs = sorted((r for r in ok if r["n"] == n), key=lambda r: r["t"])
        if len(rs) > 1:
            # the marginal cost of a local token: constant when temp is linear in T/N
            # (whatever the T-independent part: gradients, optimizer temporaries)
            steps = [(b["temp"] - a["temp"]) / ((b["t"] - a["t"]) // n) / 1024
                     for a, b in zip(rs, rs[1:])]
            out.append(f"N={n}: +temp per extra local token, T " + ", ".join(
                f"{a['t']}→{b['t']}: {x:.1f} KiB" for a, b, x in zip(rs, rs[1:], steps)))
    return out


def ms(x):
    return "-" if x is None else f"{x * 1e3:.1f}"


def print_times(rows, rounds):
    print(f"\nStep time: fastest of {rounds} interleaved round(s) after a warm-up (median). "
          "Emulated devices on a CPU share its cores:\n  this is the total work of all N "
          "devices, not a parallel speed-up.")
    fmt = "{:>6} {:>2} {:>10} {:>10} {:>10} {:>9} {:>10}"
    print(fmt.format("T", "N", "ms/step", "median", "N=1 ms", "N / N=1", "tokens/s"))
    base = {r["t"]: r.get("step_s") for r in rows if r["n"] == 1}
    for r in rows:
        if "step_s" not in r:
            print(fmt.format(r["t"], r["n"], *"-" * 5), " ",
                  r.get("error", r.get("time_error", "not timed")))
            continue
        b = base.get(r["t"])
        print(fmt.format(r["t"], r["n"], ms(r["step_s"]), ms(r["step_med_s"]), ms(b),
                         ratio(r["step_s"], b), f"{r['t'] / r['step_s']:,.0f}"))


def print_variants(rows, base):
    print("\nVariants at one size (per-device memory; step time as above when T <= --time-max)")
    fmt = "{:>6} {:>2} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>8} {:>13}"
    print(fmt.format("T", "N", "attention", "order", "total MiB", "temp MiB", "ms/step",
                     "median", "N=1 ms", "busiest/mean"))
    b = base.get("step_s")
    for r in rows:
        if "error" in r:
            print(fmt.format(r["t"], r["n"], r["variant"], r["order"], *"-" * 6), " ",
                  r["error"])
            continue
        pairs, share = busiest_share(r["t"], r["n"], r["order"])
        busiest = f"{pairs} ({share:.2f}×)" if r["variant"] == "ring" else "-"
        print(fmt.format(r["t"], r["n"], r["variant"], r["order"], mib(r["total"]),
                         mib(r["temp"]), ms(r.get("step_s")), ms(r.get("step_med_s")), ms(b),
                         busiest), " ", r.get("time_error", ""))
    print("busiest/mean (ring): the busiest device's causal sub-block pairs, the ring's unit "
          "of work, and their ratio to the mean;\n  on real devices every step waits for that "
          "device (the all-gather variant computes every pair, masked).")


def collectives(compiled) -> dict:
    text = compiled.as_text()
    return {op: len(re.findall(rf"\b{op}(-start)?\(", text))
            for op in ("collective-permute", "all-gather", "all-reduce", "reduce-scatter")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: T 256/512, < 1 min")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--time-max", type=int, default=4096, help="time steps up to this T")
    p.add_argument("--variant-seq", type=int, default=4096,
                   help="T of the ring/all-gather and zigzag/contiguous rows")
    p.add_argument("--variant-n", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[],
                   help="T:N pairs not to compile (e.g. 16384:1)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention-impl", default="xla", help="Config.attention_impl")
    p.add_argument("--overlap", action="store_true",
                   help="measure the hidden communication even on a CPU (meaningless there)")
    p.add_argument("--overlap-seq", type=int, default=None, help="default: the largest timed T")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds (one step per row each, interleaved)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.quick:
        a.seqs, a.ns, a.time_max, a.rounds = [256, 512], [1, 2, 4], 512, 1
        a.variant_seq, a.variant_n = 512, 4
    backend = jax.default_backend()
    ns = [n for n in a.ns if n <= jax.device_count()]
    cfg = model_config(a)
    skip = {tuple(int(x) for x in s.split(":")) for s in a.skip}
    started = time.perf_counter()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')} · {machine()} · backend {backend}, "
          f"{jax.device_count()} devices ({jax.devices()[0].device_kind}) · {sources()}")
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.num_kv_heads} "
          f"heads, vocab {cfg.vocab_size}, {cfg.dtype}, remat {cfg.remat}, attention "
          f"{cfg.attention_impl}; batch 1, one AdamW step; default ring, zigzag")

    setups, rows = {}, []
    for t in a.seqs:
        group = []
        for n in ns:
            if (t, n) in skip:
                group.append(dict(t=t, n=n, variant="ring", order="zigzag",
                                  error="skipped (--skip)"))
                continue
            group.append(measure(setups, cfg, t, n))
            r = group[-1]
            print(f"  T={t} N={n}: " + (r["error"] if "error" in r else
                  f"temp {mib(r['temp'])} MiB, compile {r['compile_s']:.1f}s"), flush=True)
        if t <= a.time_max:
            time_rows(setups, group, a.rounds)
            print(f"  T={t} step ms: " + ", ".join(f"N={r['n']} {ms(r.get('step_s'))}"
                                                   for r in group), flush=True)
        rows += group
    print_memory(rows)
    verdict = memory_verdict(rows)
    for line in verdict:
        print("  " + line)
    print_times([r for r in rows if r["t"] <= a.time_max], a.rounds)

    vt, vn = a.variant_seq, min(a.variant_n, max(ns))
    variants = []
    if vn > 1:
        variants = [measure(setups, cfg, vt, vn, variant=v, order=o) for v, o in
                    (("ring", "zigzag"), ("allgather", "zigzag"), ("ring", "contiguous"))]
        if vt <= a.time_max:   # all three anew, side by side
            time_rows(setups, variants, a.rounds)
        print_variants(variants, next((r for r in rows if (r["t"], r["n"]) == (vt, 1)), {}))
        if "error" not in variants[1]:
            variants[1]["collectives"] = collectives(setups[vn].compile(vt, "allgather")[0])
            print(f"all-gather variant's compiled collectives: {variants[1]['collectives']}")

    over = None
    multi = [n for n in ns if n > 1]
    if (backend != "cpu" or a.overlap) and multi:
        ot = a.overlap_seq or max([t for t in a.seqs if t <= a.time_max] or [min(a.seqs)])
        print(f"\nCommunication hidden behind compute (ring, T={ot}, N={max(multi)}; "
              + ("UNTESTED on a GPU/TPU so far" if backend != "cpu" else
                 "emulated CPU devices: the figures mean nothing, this checks the code path")
              + ")")
        try:
            over = overlap(cfg, ot, max(multi), a.rounds)
            print(f"  step as is {over['a_s'] * 1e3:.2f} ms, without K/V ppermutes "
                  f"{over['b_s'] * 1e3:.2f} ms, attention stubbed {over['c_s'] * 1e3:.2f} ms, "
                  f"both {over['d_s'] * 1e3:.2f} ms")
            print(f"  float collective-permutes in each program (K/V, dK/dV): "
                  f"{over['float_permutes']}")
            print(f"  communication ≈ {over['comm_s'] * 1e3:.2f} ms, exposed ≈ "
                  f"{over['exposed_s'] * 1e3:.2f} ms → hidden fraction "
                  + ("n/a (no measurable communication)" if over["hidden"] is None
                     else f"{over['hidden']:.0%}"))
        except Exception as e:
            over = {"error": _error(e)}
            print("  failed:", over["error"])
    elif not multi:
        print("\nCommunication overlap: skipped (needs ≥ 2 devices).")
    else:
        print("\nCommunication overlap: skipped on a CPU (emulated devices share memory and "
              "cores; run on a GPU/TPU, or pass --overlap to exercise the code path).")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "backend": backend, "rows": rows,
                       "verdict": verdict, "variants": variants, "overlap": over}, f, indent=1)


if __name__ == "__main__":
    main()
