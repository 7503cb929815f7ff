"""Decode speed: jaxlm's engine vs transformers' generate on the same random-init model.

    python benchmarks/decode.py                 # batch 1 and 8, prompt 32, 128 new tokens
    python benchmarks/decode.py --batch 1 --reps 5

A Llama-style model (hidden 512, 8 layers, 8 heads, 2 KV heads, FFN 1408, vocab 32000,
float32) is created in transformers, saved, and loaded into jaxlm with from_hf, so both run
the same weights. Both sides are timed the same way, through their public generate:

    decode time per token = (time(128 new tokens) - time(1 new token)) / 127

so prompt processing cancels. Rounds alternate jaxlm and transformers, and the ratio is the
median of per-round ratios: this kind of shared VM swings ±20% within minutes, and a
ratio of two medians taken minutes apart would measure the swing. The roofline is the time to read, once per step, every
weight the step uses (all but the embedding table, of which only the batch's rows are
read) plus the filled part of the KV cache, at the memory bandwidth measured in this run
(the best of a matrix-vector product and a reduction over 256 MiB). Also reported: time to
first token with and without prefix caching (8 requests behind one shared 512-token block).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import MODEL, machine

def bandwidth(reps: int = 5) -> dict[str, float]:
    """Bytes/s of a matrix-vector product and of a sum, both over a 256 MiB float32 array."""
    w = jnp.ones((8192, 8192), jnp.float32)
    x = jnp.ones((8192,), jnp.float32)
    tests = {"gemv": (jax.jit(lambda w, x: w @ x), (w, x)),
             "sum": (jax.jit(jnp.sum), (w,))}
    out = {}
    for name, (f, args) in tests.items():
        f(*args).block_until_ready()
        best = min(_timed(lambda: f(*args).block_until_ready()) for _ in range(reps))
        out[name] = w.nbytes / best
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_setup(path: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


def hf_generate(model, prompts: np.ndarray, n: int) -> np.ndarray:
    import torch
    x = torch.from_numpy(prompts).long()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
    return out[:, prompts.shape[1]:].numpy()


def per_token(runs: dict, new_tokens: int, rounds: int) -> dict[str, dict[str, float]]:
    """Decode seconds per step of each named run (a function of the number of new tokens).

    Each round times every run at 1 and at new_tokens tokens, back to back, so load from
    other processes (this VM's memory bandwidth is shared) hits all of them alike:
    step = (t(new_tokens) - t(1)) / (new_tokens - 1) per round, and per-round ratios
    compare runs measured seconds apart. Returns per run: median step, best step, median
    time for 1 token; and per pair "ratio" entries (median of per-round ratios)."""
    steps = {name: [] for name in runs}
    firsts = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            short = _timed(lambda: run(1))
            long = _timed(lambda: run(new_tokens))
            steps[name].append((long - short) / (new_tokens - 1))
            firsts[name].append(short)
    out = {name: dict(step=statistics.median(v), best=min(v),
                      first=statistics.median(firsts[name])) for name, v in steps.items()}
    names = list(runs)
    for other in names[1:]:
        out[other]["ratio"] = statistics.median(
            o / j for o, j in zip(steps[other], steps[names[0]]))
    return out


def step_bytes(cfg, batch: int, filled: float) -> float:
    """Bytes one decode step must read: weights (embedding table: the batch's rows only,
    unless it is also the tied LM head) + the filled K/V of every layer."""
    from flax import nnx
    from jaxlm.model import abstract_model
    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    emb = state["embed"]["embedding"]
    if not cfg.tie_embeddings:
        total -= emb.size * emb.dtype.itemsize - batch * cfg.d_model * emb.dtype.itemsize
    kv = 2 * cfg.n_layers * batch * filled * cfg.num_kv_heads * cfg.dim_per_head * 4
    return total + kv


def prefix_ttft(engine, reps: int, shared_len=512, suffix_len=(16, 32), batch=8):
    rng = np.random.default_rng(1)
    shared = rng.integers(0, engine.cfg.vocab_size, shared_len).tolist()
    prompts = [shared + rng.integers(0, engine.cfg.vocab_size,
                                     rng.integers(*suffix_len)).tolist() for _ in range(batch)]
    key = jax.random.key(0)

    def ttft(prefix_cache, clear):
        if clear:
            engine.prefixes.clear()
        t = time.perf_counter()
        first, _, cache = engine.prefill_prompts(prompts, 16, key, prefix_cache=prefix_cache)
        np.asarray(first)
        return time.perf_counter() - t, np.asarray(first)

    for args in ((False, True), (True, True), (True, False)):  # compile
        ttft(*args)
    res = {"without": [], "with (prefix computed in the call)": [],
           "with (prefix already cached)": []}
    firsts = {}
    for _ in range(reps):
        for name, args in zip(res, ((False, True), (True, True), (True, False))):
            dt, first = ttft(*args)
            res[name].append(dt)
            firsts[name] = first
    same = all(np.array_equal(f, firsts["without"]) for f in firsts.values())
    return {k: statistics.median(v) for k, v in res.items()}, same, sum(map(len, prompts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-prefix", action="store_true")
    args = p.parse_args(argv)

    from jaxlm.infer import Engine
    from jaxlm.model import from_hf
    print(f"# decode benchmark  {datetime.datetime.now():%Y-%m-%d %H:%M}  {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_setup(tmp)
        import torch
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"load average {os.getloadavg()[0]:.1f}")
        engine = Engine(from_hf(tmp))
    cfg = engine.cfg
    bw = bandwidth()
    best_bw = max(bw.values())
    print("bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    n, t = args.new_tokens, args.prompt_len
    rows = []
    for b in args.batch:
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
        as_lists = prompts.tolist()
        jax_run = lambda k: engine.generate(as_lists, max_new_tokens=k)  # noqa: E731
        jax_tokens = jax_run(n)  # compiles (and the 1-token shape below)
        jax_run(1)
        runs = {"jaxlm": jax_run}
        if not args.skip_hf:
            hf_tokens = hf_generate(model, prompts, n)
            runs["transformers"] = lambda k: hf_generate(model, prompts, k)  # noqa: E731
        res = per_token(runs, n, args.reps)
        jax_step = res["jaxlm"]["step"]
        filled = t + (n - 1) / 2  # mean cache positions attended per decode step
        roof_step = step_bytes(cfg, b, filled) / best_bw
        line = dict(batch=b, jax_ms=1e3 * jax_step, jax_best_ms=1e3 * res["jaxlm"]["best"],
                    jax_tps=b / jax_step, ttft_ms=1e3 * res["jaxlm"]["first"],
                    roof_ms=1e3 * roof_step, roof_frac=roof_step / jax_step)
        if not args.skip_hf:
            hf = res["transformers"]
            line.update(hf_ms=1e3 * hf["step"], hf_tps=b / hf["step"], ratio=hf["ratio"],
                        match=np.mean(np.asarray(jax_tokens) == hf_tokens))
        rows.append(line)
        print(_format(line), flush=True)
    mib = engine.new_cache(max(args.batch), t + n).nbytes / 2**20
    print(f"cache memory at batch {max(args.batch)}, {t + n} slots: {mib:.1f} MiB")
    if not args.skip_prefix:
        times, same, total = prefix_ttft(engine, args.reps)
        print(f"time to first token, 8 prompts of one shared 512-token block + 16-31 own "
              f"tokens ({total} tokens), first tokens identical: {same}")
        for k, v in times.items():
            print(f"  {k:38s} {1e3 * v:8.1f} ms")
    return rows


def _format(r) -> str:
    s = (f"batch {r['batch']}: jaxlm {r['jax_ms']:.2f} ms/step (best {r['jax_best_ms']:.2f}) "
         f"= {r['jax_tps']:.1f} tok/s (first token {r['ttft_ms']:.1f} ms)")
    if "hf_ms" in r:
        s += (f" | transformers {r['hf_ms']:.2f} ms/step = {r['hf_tps']:.1f} tok/s "
              f"| ratio {r['ratio']:.2f}x | tokens equal {100 * r['match']:.0f}%")
    s += f" | roofline {r['roof_ms']:.2f} ms/step, jaxlm at {100 * r['roof_frac']:.0f}%"
    return s


if __name__ == "__main__":
    main()
