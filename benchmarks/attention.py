"""Attention speed and memory: jaxlm's Pallas kernels vs jax.nn.dot_product_attention.

    python benchmarks/attention.py            # full sweep (meant for a GPU)
    python benchmarks/attention.py --quick    # tiny CPU smoke run (interpret mode)
    python benchmarks/attention.py --isolate  # one subprocess per row: exact device peaks

Rows: sequence 1k–16k × head dim 64/128 × causal or not × forward or forward+backward,
for `pallas` (ops/pallas, Triton on GPU), `xla` and `cudnn` (GPU only). Batch × heads is
chosen so that every row holds 16k tokens × 2048 model width (FlashAttention's convention).

TFLOP/s: forward FLOPs = 4·b·t·s·h·d, halved when causal; forward+backward ≈ 3.5× that.
Memory: XLA's compiled memory_analysis (arguments + outputs + temporaries, i.e. what the
program allocates); with --isolate on a GPU, the device's peak_bytes_in_use of a fresh process.

Targets on an H100: pallas forward ≥ 0.8× cuDNN, forward+backward ≥ 0.7× cuDNN, memory
linear in sequence length. Status: GPU figures still to be measured (no GPU was available
when the kernels were written); CPU interpret-mode numbers say nothing about speed and are
for checking that the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

try:
    from jaxlm.ops.pallas import dispatch
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from jaxlm.ops.pallas import dispatch

TOKENS, WIDTH = 16384, 2048


def attention_fn(impl: str, causal: bool):
    if impl == "pallas":
        return lambda q, k, v: dispatch.attention(q, k, v, causal=causal)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation=impl)


def build(impl, mode, causal, b, t, h, d, dtype):
    """(jitted function, its arguments)."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, h, d), dtype) for kk in ks)
    attn = attention_fn(impl, causal)
    if mode == "fwd":
        return jax.jit(attn), (q, k, v)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)
    return jax.jit(fwd_bwd), (q, k, v, do)


def flops(mode, causal, b, t, h, d):
    f = 4 * b * t * t * h * d / (2 if causal else 1)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def measure(impl, mode, causal, t, d, dtype, iters, tokens=TOKENS, width=WIDTH):
    h = width // d
    b = max(1, tokens // t)
    fn, args = build(impl, mode, causal, b, t, h, d, dtype)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    mem_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(impl=impl, mode=mode, causal=causal, t=t, d=d, b=b, h=h, ms=sec * 1e3,
                tflops=flops(mode, causal, b, t, h, d) / sec / 1e12, mem=mem_bytes,
                device_peak=stats.get("peak_bytes_in_use"))


def run_row(row, isolate):
    if not isolate:
        try:
            return measure(**row)
        except Exception as e:  # OOM or unsupported shape: keep the sweep going
            return dict(row, dtype=row["dtype"].__name__, error=type(e).__name__ + ": " + str(e).splitlines()[0][:80])
    cmd = [sys.executable, __file__, "--row", json.dumps(dict(row, dtype=row["dtype"].__name__))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return dict(row, dtype=row["dtype"].__name__, error=(res.stderr.strip().splitlines() or ["failed"])[-1][:80])
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_table(results, anchor):
    fmt = "{:>6} {:>4} {:>6} {:>8} {:>7} {:>10} {:>9} {:>8} {:>9}"
    print(fmt.format("seq", "d", "causal", "mode", "impl", "ms", "TFLOP/s", "mem MiB",
                     f"vs {anchor}"))
    by_key = {(r["t"], r["d"], r["causal"], r["mode"], r["impl"]): r for r in results}
    for r in results:
        if "error" in r:
            print(fmt.format(r["t"], r["d"], str(r["causal"]), r["mode"], r["impl"], "-", "-",
                             "-", "-"), " ", r["error"])
            continue
        base = by_key.get((r["t"], r["d"], r["causal"], r["mode"], anchor), {})
        ratio = r["tflops"] / base["tflops"] if base.get("tflops") else float("nan")
        mem = r["device_peak"] if r.get("device_peak") is not None else r["mem"]
        print(fmt.format(r["t"], r["d"], str(r["causal"]), r["mode"], r["impl"],
                         f"{r['ms']:.2f}", f"{r['tflops']:.2f}",
                         "-" if mem is None else f"{mem / 2**20:.0f}", f"{ratio:.2f}"))


def check_targets(results, anchor):
    if anchor != "cudnn":
        print("\nNo cuDNN here: the H100 targets (fwd ≥ 0.8×, fwd+bwd ≥ 0.7× cuDNN) are not "
              "checked; interpret-mode timings are not performance figures.")
        return
    want = {"fwd": 0.8, "fwd+bwd": 0.7}
    ok = []
    for r in results:
        if r["impl"] != "pallas" or "error" in r:
            continue
        base = next((x for x in results if x["impl"] == "cudnn" and "error" not in x and
                     (x["t"], x["d"], x["causal"], x["mode"]) ==
                     (r["t"], r["d"], r["causal"], r["mode"])), None)
        if base:
            ok.append(r["tflops"] / base["tflops"] >= want[r["mode"]])
    print(f"\nTargets met in {sum(ok)}/{len(ok)} rows (fwd ≥ 0.8×, fwd+bwd ≥ 0.7× cuDNN).")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--impls", nargs="+", default=None, help="default: pallas xla [cudnn]")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--isolate", action="store_true", help="one subprocess per row")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--row", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.row:  # child of --isolate
        row = json.loads(a.row)
        row["dtype"] = getattr(jnp, row["dtype"])
        print(json.dumps(measure(**row)))
        return

    on_gpu = jax.default_backend() == "gpu"
    tokens, width = TOKENS, WIDTH
    if a.quick:
        tokens, width = 256, 128
        a.seqs, a.head_dims, a.iters = [128, 256], [64], 1
    impls = a.impls or (["pallas", "xla", "cudnn"] if on_gpu else ["pallas", "xla"])
    anchor = "cudnn" if "cudnn" in impls else "xla"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"pallas backend: {dispatch.default_backend()}, dtype {a.dtype}")
    results = []
    for d in a.head_dims:
        for t in a.seqs:
            for causal in (False, True):
                for mode in a.modes:
                    for impl in impls:
                        row = dict(impl=impl, mode=mode, causal=causal, t=t, d=d,
                                   dtype=getattr(jnp, a.dtype), iters=a.iters,
                                   tokens=tokens, width=width)
                        results.append(run_row(row, a.isolate))
    print_table(results, anchor)
    check_targets(results, anchor)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
