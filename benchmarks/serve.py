"""Serving under load: jaxlm's OpenAI-compatible server (continuous batching) vs jaxlm
static batching vs transformers' continuous batching, on the same weights and requests.

    python benchmarks/serve.py                        # defaults: ~5 min on 2 CPU cores
    python benchmarks/serve.py --requests 16 --rate 4 # a quick check
    python benchmarks/serve.py --preset small --out serve.json

The model: the default training run's architecture (--preset tiny: byte vocabulary,
d_model 256, 4 layers, GQA 4/2), random init (seed 0), exported with to_hf, so
`python -m jaxlm.serve --hf DIR` and transformers' LlamaForCausalLM load the same
weights. Greedy, no stop tokens: every request yields exactly its max_tokens, so the
three sides do the same useful work.

Workload (--seed): --requests requests arriving as a Poisson process at --rate req/s,
prompts of uniform random length (--prompt-len) of random token ids, skewed output
lengths: --long-frac of them long (--long-out), the rest short (--short-out).

1. server: `python -m jaxlm.serve` in its own process (the load generator does not share
   its GIL); it compiles its whole menu of step shapes before listening (excluded; the
   count comes from /metrics, and none may compile later), a burst of requests warms the
   HTTP path, then it is driven by asyncio + httpx2 streaming clients sending each request at
   its arrival time, at most --concurrency in flight. TTFT: send → first SSE chunk with
   tokens; TPOT: (last − first token time) / (tokens − 1). Throughput: tokens / (first
   send → last done).
2. static: jaxlm Engine.generate on batches of --max-seqs requests in arrival order,
   each batch decoding max(max_tokens) of its rows (shorter rows' extra steps are waste).
   Offline: every request is known up front and none waits for its arrival, which
   favours it. One untimed pass compiles every batch's shapes first.
2b. scheduler: the server's Scheduler in this process with every request submitted at
   once: the engine's capacity without HTTP and without waiting for arrivals.
2c. decode step: ms per step for max_seqs rows, the scheduler's decode program at each
   block-table width against the static engine's decode step: what a paged gather costs.
3. transformers: its continuous-batching manager (the engine under generate_batch),
   float32, offline (all requests at once). generate_batch takes one max_new_tokens for
   all; the manager's add_request takes one per request, so each row decodes exactly its
   own. A few requests warm it up first.
Throughput of 2 and 3 = useful (requested) tokens / wall time.

--runs picks what runs (default `base`: 1-3 above). Two more, each the server against
itself without the feature, same requests, one run, ratio printed:
4. adapters: --lora-adapters N random LoRAs (rank 8 on q/k/v/o, saved in PEFT's format)
   served with --lora-modules, the requests spread round-robin over them (each request's
   `model` names one), against the server of the base model alone. Goal ≥ 0.8×.
5. speculative: prompt lookup (--prompt-lookup 3 --spec-tokens 4) against plain decoding
   at low concurrency (1, 2, 4 clients, closed loop), on a trained model (--spec-run RUN;
   default: the default training run, trained here in ~2 min) with input-grounded
   prompts: a block of Python source from the standard library, a marker line, then the
   block's first line — the model is asked to repeat code it has just read, as an "edit
   this code" request does. Goal ≥ 1.3×.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from common import machine

GOAL_VS_STATIC, GOAL_VS_HF = 1.5, 2.0


# Workload -----------------------------------------------------------------------------------
def workload(args, vocab: int) -> list[dict]:
    """Requests {t: arrival s, prompt: ids, max_tokens}, in arrival order."""
    rng = np.random.default_rng(args.seed)
    n = args.requests
    arrivals = np.cumsum(rng.exponential(1 / args.rate, n)) - 1 / args.rate
    lens = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, n)
    long = rng.random(n) < args.long_frac
    outs = np.where(long, rng.integers(args.long_out[0], args.long_out[1] + 1, n),
                    rng.integers(args.short_out[0], args.short_out[1] + 1, n))
    return [{"t": float(max(t, 0)), "prompt": rng.integers(0, vocab, k).tolist(),
             "max_tokens": int(m)} for t, k, m in zip(arrivals, lens, outs)]


def pcts(xs) -> list[float]:
    """p50, p90, p99."""
    return [float(np.percentile(xs, q)) if len(xs) else float("nan") for q in (50, 90, 99)]


# 1. The server ------------------------------------------------------------------------------
def start_server(hf_dir: str, args, max_len: int, extra=(), source="--hf"):
    """(process, base URL) once it prints its `serving ... on URL` line."""
    cmd = [sys.executable, "-m", "jaxlm.serve", source, hf_dir, "--port", "0",
           "--max-seqs", str(args.max_seqs), "--max-batched-tokens",
           str(args.max_batched_tokens), "--page-size", str(args.page_size),
           "--kv-memory", args.kv_memory, "--max-len", str(max_len),
           "--decode-steps", str(args.decode_steps), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, ready, url = [], threading.Event(), {}

    def drain():  # keep reading, or a full pipe would block the server
        for line in proc.stdout:
            log.append(line.rstrip())
            m = re.search(r"serving .* on (http://\S+)", line)
            if m:
                url["base"] = m.group(1)
                ready.set()
        ready.set()
    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or "base" not in url:
        proc.kill()
        sys.exit("the server did not start:\n" + "\n".join(log[-30:]))
    return proc, url["base"]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def one(client, base: str, req: dict, t0: float, sem) -> dict:
    """Send req at its arrival time (or when a client slot frees); stream its tokens."""
    await asyncio.sleep(max(0.0, t0 + req["t"] - time.perf_counter()))
    async with sem:
        sent, times, tokens = time.perf_counter(), [], []
        body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "stream": True,
                "temperature": 0.0, "return_token_ids": True, "seed": 0}
        if req.get("model"):
            body["model"] = req["model"]
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    new = json.loads(line[6:])["choices"][0].get("token_ids") or []
                    if new:
                        times.append(time.perf_counter())
                        tokens += new
            error = None if len(tokens) == req["max_tokens"] else (
                f"{len(tokens)} tokens, not {req['max_tokens']}")
        except Exception as e:  # counted as a failed request, reported below
            error = f"{type(e).__name__}: {e}"
    done = time.perf_counter()
    return {"sent": sent, "done": done, "tokens": tokens, "error": error,
            "ttft": times[0] - sent if times else None,
            "tpot": (times[-1] - times[0]) / (len(tokens) - 1) if len(tokens) > 1 else None}


async def drive(base: str, reqs: list[dict], concurrency: int) -> list[dict]:
    import httpx2
    sem = asyncio.Semaphore(concurrency)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, base, r, t0, sem) for r in reqs))


def warmup_requests(reqs: list[dict], args) -> list[dict]:
    """Requests spanning the workload's prompt and output lengths, all at once, so the
    server compiles its step shapes (prefill chunks, block-table widths) now."""
    k = 2 * args.max_seqs
    lens = np.linspace(args.prompt_len[0], args.prompt_len[1], k).astype(int)
    most = max(r["max_tokens"] for r in reqs)
    return [{"t": 0.0, "prompt": [(7 * i + j) % 256 for j in range(n)],
             "max_tokens": most if i % 4 == 0 else args.short_out[0]}
            for i, n in enumerate(lens)]


def warm_server(base: str, reqs: list[dict], args) -> float:
    """The server compiles every step shape before it listens (Scheduler.warmup); one
    burst here warms the HTTP path and checks that it compiled nothing more. Returns the
    programs compiled."""
    import httpx2
    burst = warmup_requests(reqs, args)
    for i, w in enumerate(burst):   # every adapter of the workload is warmed too
        w["model"] = reqs[i % len(reqs)].get("model")
    warm = asyncio.run(drive(base, burst, args.concurrency))
    assert not any(w["error"] for w in warm), [w["error"] for w in warm][:3]
    return metric(httpx2.get(f"{base}/metrics").text, "jaxlm_compiled_programs")


def run_server(hf_dir: str, reqs: list[dict], args, max_len: int, extra=(),
               source="--hf", concurrency=None, warm=None) -> dict:
    import httpx2
    proc, base = start_server(hf_dir, args, max_len, extra, source)
    concurrency = concurrency or args.concurrency
    try:
        t = time.perf_counter()
        programs_warm = warm_server(base, warm or reqs, args)
        warm_s = time.perf_counter() - t
        print(f"server: warmed up in {warm_s:.0f} s, {programs_warm:.0f} step programs "
              f"compiled", flush=True)
        results = asyncio.run(drive(base, reqs, concurrency))
        text = httpx2.get(f"{base}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    ok = [r for r in results if r["error"] is None]
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    return {"tok_s": sum(len(r["tokens"]) for r in ok) / wall, "wall_s": wall,
            "failed": len(results) - len(ok),
            "errors": [r["error"] for r in results if r["error"]][:5],
            "exit_code": code, "warmup_s": warm_s, "programs_warmup": programs_warm,
            "programs_total": metric(text, "jaxlm_compiled_programs"),
            "preemptions": metric(text, "jaxlm_preemptions"),
            "prefix_hit_tokens": metric(text, "jaxlm_prefix_hit_tokens"),
            "ttft": pcts([r["ttft"] for r in ok]),
            "tpot": pcts([r["tpot"] for r in ok if r["tpot"] is not None]),
            "e2e": pcts([r["done"] - r["sent"] for r in ok]),
            "acceptance": metric(text, "jaxlm_spec_acceptance_rate"),
            "per_forward": metric(text, "jaxlm_spec_tokens_per_forward"),
            "outputs": [r["tokens"] for r in results]}


# 2. Static batching -------------------------------------------------------------------------
def run_static(lm, reqs: list[dict], args, max_len: int) -> dict:
    from jaxlm.infer import Engine
    engine = Engine(lm, max_len=max_len)
    batches = [reqs[i:i + args.max_seqs] for i in range(0, len(reqs), args.max_seqs)]

    def one_pass():
        outs = []
        for b in batches:
            got = engine.generate([r["prompt"] for r in b],
                                  max_new_tokens=max(r["max_tokens"] for r in b))
            outs += [g[:r["max_tokens"]] for g, r in zip(got, b)]
        return outs
    t = time.perf_counter()
    one_pass()  # every batch's (prompt, cache, max_new_tokens) shapes compile here
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = one_pass()
    wall = time.perf_counter() - t
    useful = sum(r["max_tokens"] for r in reqs)
    decoded = sum(len(b) * max(r["max_tokens"] for r in b) for b in batches)
    print(f"static: warm-up pass {warm_s:.0f} s, timed pass {wall:.1f} s", flush=True)
    return {"tok_s": useful / wall, "wall_s": wall, "warmup_s": warm_s,
            "useful_frac": useful / decoded, "outputs": outs}


# 2b. The same scheduler in process, offline ----------------------------------------------------
def run_scheduler(lm, reqs: list[dict], args, max_len: int) -> dict:
    """What the engine does without HTTP and without waiting for arrivals: every request
    submitted at once to a Scheduler with the server's settings (shapes compiled first)."""
    from jaxlm.infer.scheduler import Request, Scheduler
    from jaxlm.model.memory import parse_bytes
    sched = Scheduler(lm, page_size=args.page_size, kv_memory=parse_bytes(args.kv_memory),
                      max_seqs=args.max_seqs, max_batched_tokens=args.max_batched_tokens,
                      max_len=max_len, decode_steps=args.decode_steps)
    sched.warmup()
    t = time.perf_counter()
    for r in reqs:
        sched.submit(Request(r["prompt"], r["max_tokens"]))
    tokens = 0
    while sched.has_work:
        tokens += sum(len(e.tokens) for e in sched.step())
    wall = time.perf_counter() - t
    return {"tok_s": tokens / wall, "wall_s": wall}


# 2c. One decode step: paged (by block-table width) vs the static engine ---------------------
def run_decode_step(lm, args, max_len: int, rounds: int = 20) -> dict:
    """ms per decode step for max_seqs rows: the scheduler's K-step decode program at each
    block-table width of its menu (the XLA reference gathers that many slots per row every
    step) against the static engine's decode (its cache of max_len slots read in place)."""
    import jax
    from jaxlm.infer import Engine
    from jaxlm.infer.scheduler import Scheduler
    from jaxlm.infer.steps import DecodeInputs, compiled
    from jaxlm.model.memory import parse_bytes
    n, z = args.max_seqs, args.page_size
    sched = Scheduler(lm, page_size=z, kv_memory=parse_bytes(args.kv_memory), max_seqs=n,
                      max_batched_tokens=args.max_batched_tokens, max_len=max_len,
                      decode_steps=args.decode_steps)
    step, runner = compiled(sched.graphs, args.decode_steps), sched.runner
    paged = {}
    for width in sched.menu.pages:
        x = DecodeInputs.empty(n, width)
        x.tables[:] = np.arange(width)            # rows may share pages: timing only
        x.positions[:] = width * z // 2
        x.lengths[:], x.limits[:] = x.positions + 1, width * z
        times = []
        for _ in range(rounds + 2):               # the first two: compile, warm caches
            t = time.perf_counter()
            out, runner.pools = step(runner.weights, runner.pools, x)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        paged[width * z] = 1e3 * float(np.median(times[2:])) / args.decode_steps
    engine, prompts = Engine(lm, max_len=max_len), [[1] * 16] * n

    def gen(k):
        t = time.perf_counter()
        engine.generate(prompts, max_new_tokens=k)
        return time.perf_counter() - t
    gen(1), gen(129)                              # compile both
    static = 1e3 * float(np.median([gen(129) - gen(1) for _ in range(5)])) / 128
    return {"paged_ms": paged, "static_ms": static, "static_slots": max_len}


# 3. transformers ----------------------------------------------------------------------------
def run_hf(hf_dir: str, reqs: list[dict], args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bar
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation=args.hf_attn).eval()
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max(r["max_tokens"] for r in reqs))
    cb = ContinuousBatchingConfig(max_requests_per_batch=args.max_seqs,
                                  max_batch_tokens=args.max_batched_tokens,
                                  page_size=args.page_size)

    def submit_all(manager, batch, tag):
        for i, r in enumerate(batch):
            manager.add_request(r["prompt"], request_id=f"{tag}{i}",
                                max_new_tokens=r["max_tokens"], eos_token_id=-1)
        results = {}
        while len(results) < len(batch):
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished():
                results[res.request_id] = res
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped")
        return [results[f"{tag}{i}"] for i in range(len(batch))]

    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=30) as m:
        t = time.perf_counter()
        submit_all(m, warmup_requests(reqs, args)[:args.max_seqs], "warm")
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        results = submit_all(m, reqs, "req")
        wall = time.perf_counter() - t
    outs = [list(r.generated_tokens) for r in results]
    bad = sum(r.error is not None or len(o) != q["max_tokens"]
              for r, o, q in zip(results, outs, reqs))
    print(f"transformers: warm-up {warm_s:.0f} s, timed {wall:.1f} s", flush=True)
    return {"tok_s": sum(q["max_tokens"] for q in reqs) / wall, "wall_s": wall,
            "warmup_s": warm_s, "failed": bad, "attn": args.hf_attn, "outputs": outs}


# 4. Many adapters -----------------------------------------------------------------------------
def save_loras(lm, n: int, work: str) -> dict[str, str]:
    """n random LoRAs over lm (rank 8 on q/k/v/o, B ≠ 0 as after training), each saved in
    PEFT's format: {name: directory}."""
    import jax
    from flax import nnx
    from jaxlm.model import peft
    from jaxlm.model.io.peft import save_peft
    out = {}
    for i in range(n):
        adapted = peft.attach(nnx.merge(*nnx.split(lm)), peft.LoraSpec(
            r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")), seed=i)
        rng = np.random.default_rng(i)
        for _, var in nnx.to_flat_state(nnx.state(adapted, peft.Adapter)):
            var.set_value(jax.numpy.asarray(rng.normal(0, 0.02, var.shape), var.dtype))
        out[f"lora{i}"] = os.path.join(work, f"lora{i}")
        save_peft(adapted, out[f"lora{i}"])
    return out


def run_adapters(hf_dir: str, lm, reqs: list[dict], args, max_len: int, work: str) -> dict:
    loras = save_loras(lm, args.lora_adapters, work)
    names = list(loras)
    spread = [{**r, "model": names[i % len(names)]} for i, r in enumerate(reqs)]
    one = run_server(hf_dir, reqs, args, max_len)
    many = run_server(hf_dir, spread, args, max_len,
                      ["--lora-modules", *(f"{k}={v}" for k, v in loras.items())])
    return {"one": one, "many": many, "ratio": many["tok_s"] / one["tok_s"],
            "n": len(names)}


# 5. Speculative decoding at low concurrency ------------------------------------------------
def grounded_requests(n: int, tokenizer, seed: int, max_tokens: int) -> list[dict]:
    """Prompts that ask to repeat code just read: a block of a stdlib module, a marker,
    then the block's first line; greedy continuation copies the block."""
    import inspect
    import json as json_mod
    import textwrap
    rng = np.random.default_rng(seed)
    lines = [ln for ln in inspect.getsource(json_mod.decoder).splitlines() if ln.strip()]
    lines += [ln for ln in inspect.getsource(textwrap).splitlines() if ln.strip()]
    out = []
    for _ in range(n):
        i = int(rng.integers(0, len(lines) - 12))
        block = "\n".join(lines[i:i + 10]) + "\n"
        text = block + "\n# the same code again:\n" + lines[i] + "\n"
        out.append({"t": 0.0, "prompt": tokenizer.encode(text), "max_tokens": max_tokens})
    return out


def train_run(work: str) -> str:
    run = os.path.join(work, "spec-run")
    subprocess.run([sys.executable, "-m", "jaxlm.train", "--run_dir", run], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return run


def run_speculative(args, work: str) -> dict:
    from jaxlm.model.io.runs import load_run
    run = args.spec_run or train_run(work)
    _, tokenizer, _ = load_run(run)
    reqs = grounded_requests(args.spec_requests, tokenizer, args.seed, args.spec_out)
    max_len = max(len(r["prompt"]) for r in reqs) + args.spec_out + 8
    out = {}
    for clients in (1, 2, 4):
        plain = run_server(run, reqs, args, max_len, source="--checkpoint",
                           concurrency=clients, warm=reqs)
        spec = run_server(run, reqs, args, max_len, ["--prompt-lookup", "3",
                                                     "--spec-tokens", "4"],
                          source="--checkpoint", concurrency=clients, warm=reqs)
        same = agreement(plain["outputs"], spec["outputs"])
        out[clients] = {"plain": plain["tok_s"], "spec": spec["tok_s"],
                        "ratio": spec["tok_s"] / plain["tok_s"], "same": same,
                        "acceptance": spec["acceptance"], "per_forward": spec["per_forward"]}
        print(f"speculative, {clients} clients: {out[clients]}", flush=True)
    return out


# The benchmark ------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pair = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731  "lo,hi"
    p.add_argument("--preset", default="tiny", help="jaxlm.model preset, random init")
    # 32 req/s × ~53 tokens ≈ the tiny server's ~1700 tokens/s on 2 cores: loaded
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rate", type=float, default=128.0, help="Poisson arrivals, requests/s "
                   "(the default saturates the server, so throughput is its capacity)")
    p.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    p.add_argument("--prompt-len", type=pair, default=(16, 128), metavar="LO,HI")
    p.add_argument("--short-out", type=pair, default=(8, 32), metavar="LO,HI")
    p.add_argument("--long-out", type=pair, default=(128, 256), metavar="LO,HI")
    p.add_argument("--long-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seqs", type=int, default=16, help="server rows = static batch")
    p.add_argument("--max-batched-tokens", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=4, help="the server's tokens per "
                   "row per device call while all rows decode")
    p.add_argument("--kv-memory", default="256MiB")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation "
                   "('sdpa' or 'paged|eager' run continuous batching on CPU)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--runs", default="base", help="comma-separated: base (1-3), adapters "
                   "(4), speculative (5)")
    p.add_argument("--lora-adapters", type=int, default=8, help="adapters in run 4")
    p.add_argument("--spec-run", metavar="RUN", help="run 5's trained model (default: "
                   "train the default run)")
    p.add_argument("--spec-requests", type=int, default=16)
    p.add_argument("--spec-out", type=int, default=96, help="run 5's tokens per request")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax
    from jaxlm.model import create, preset, to_hf
    t_start = time.perf_counter()
    cfg = preset(args.preset)
    lm = create(cfg, 0)
    reqs = workload(args, cfg.vocab_size)
    max_len = args.prompt_len[1] + args.long_out[1]
    runs = set(args.runs.split(","))
    if runs - {"base", "adapters", "speculative"}:
        sys.exit(f"--runs: unknown {sorted(runs - {'base', 'adapters', 'speculative'})}")
    res = {}
    with tempfile.TemporaryDirectory() as work:
        hf_dir = os.path.join(work, f"{args.preset}-random")
        to_hf(lm, hf_dir)
        if "base" in runs:
            res["server"] = run_server(hf_dir, reqs, args, max_len)
            res["static"] = run_static(lm, reqs, args, max_len)
            res["scheduler"] = run_scheduler(lm, reqs, args, max_len)
            res["decode_step"] = run_decode_step(lm, args, max_len)
            if not args.skip_hf:
                res["transformers"] = run_hf(hf_dir, reqs, args)
        if "adapters" in runs:
            res["adapters"] = run_adapters(hf_dir, lm, reqs, args, max_len, work)
        if "speculative" in runs:
            res["speculative"] = run_speculative(args, work)
    import torch
    import transformers
    env = {"machine": machine(), "jax": jax.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__,
           "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"}
    if "server" in res:
        report(args, cfg, reqs, res, env)
    report_features(args, res, env)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "env": env, "results": res}, f, indent=1,
                      default=lambda o: None)
    return res


def agreement(a: list, b: list) -> str:
    """Requests whose greedy outputs are identical (same weights; float order differs)."""
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def report(args, cfg, reqs, res, env) -> None:
    s, st, hf, sc = res["server"], res["static"], res.get("transformers"), res["scheduler"]
    ds = res["decode_step"]
    outs = [r["max_tokens"] for r in reqs]
    print()
    print(f"Serving benchmark, {env['date']}, {env['machine']}, torch {env['torch']}, "
          f"transformers {env['transformers']}")
    print(f"model: preset {args.preset} (vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
          f"{cfg.n_layers} layers, heads {cfg.n_heads}/{cfg.n_kv_heads}), random init, "
          f"float32, greedy, no stop tokens")
    print(f"workload: {len(reqs)} requests, Poisson {args.rate:g} req/s (last arrival "
          f"{reqs[-1]['t']:.1f} s), prompts {args.prompt_len[0]}..{args.prompt_len[1]} "
          f"tokens, outputs {100 * (1 - args.long_frac):.0f}% {args.short_out[0]}.."
          f"{args.short_out[1]} / {100 * args.long_frac:.0f}% {args.long_out[0]}.."
          f"{args.long_out[1]} (mean {np.mean(outs):.0f}, total {sum(outs)} tokens); "
          f"max_seqs {args.max_seqs}, max_batched_tokens {args.max_batched_tokens}, "
          f"concurrency {args.concurrency}")
    print()
    print("| side | tokens/s | server / this (goal) | TTFT p50/p90/p99 ms "
          "| TPOT p50/p90/p99 ms | e2e p50/p90/p99 s |")
    print("|---|---|---|---|---|---|")
    ms = lambda xs: "/".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
    print(f"| jaxlm server (continuous, online) | {s['tok_s']:.0f} | | {ms(s['ttft'])} | "
          f"{ms(s['tpot'])} | " + "/".join(f"{x:.2f}" for x in s["e2e"]) + " |")
    print(f"| jaxlm scheduler in process (offline, no HTTP) | {sc['tok_s']:.0f} | | | | |")
    r_st = s["tok_s"] / st["tok_s"]
    print(f"| jaxlm static batches of {args.max_seqs} (offline) | {st['tok_s']:.0f} | "
          f"{r_st:.2f}x (>= {GOAL_VS_STATIC:g}x) | | | |")
    if hf:
        r_hf = s["tok_s"] / hf["tok_s"]
        print(f"| transformers continuous batching, {hf['attn']} (offline) | "
              f"{hf['tok_s']:.0f} | {r_hf:.2f}x (>= {GOAL_VS_HF:g}x) | | | |")
    print()
    print(f"server: {s['failed']} failed requests{' ' + str(s['errors']) if s['errors'] else ''}"
          f", exit status {s['exit_code']} after SIGTERM, {s['programs_warmup']:.0f} step "
          f"programs compiled at server start (Scheduler.warmup, excluded), "
          f"{s['programs_total'] - s['programs_warmup']:.0f} more during the timed run "
          f"(included), {s['preemptions']:.0f} preemptions; wall {s['wall_s']:.1f} s "
          f"from first send to last done. TTFT counts from the client's send (a request "
          f"waiting for a --concurrency slot is not yet sent).")
    print(f"static: {100 * st['useful_frac']:.0f}% of decoded rows' tokens were requested "
          f"(the rest: rows past their max_tokens while their batch's longest runs); "
          f"compile excluded (untimed first pass); wall {st['wall_s']:.1f} s.")
    if hf:
        print(f"transformers: per-request max_new_tokens through the continuous-batching "
              f"manager's add_request (generate_batch takes one for all), "
              f"attn_implementation={hf['attn']}, {hf['failed']} failed, warm-up "
              f"excluded; wall {hf['wall_s']:.1f} s.")
    print(f"same outputs (greedy): server = static for {agreement(s['outputs'], st['outputs'])}"
          + (f" requests, server = transformers for "
             f"{agreement(s['outputs'], hf['outputs'])}" if hf else "") + " requests")
    met = "met" if r_st >= GOAL_VS_STATIC else "NOT met"
    print(f"goal: server >= {GOAL_VS_STATIC:g}x static: {met} ({r_st:.2f}x; static runs "
          f"offline, which favours it)")
    if hf:
        met = "met" if r_hf >= GOAL_VS_HF else "NOT met"
        print(f"goal: server >= {GOAL_VS_HF:g}x transformers: {met} ({r_hf:.2f}x)")
    widths = ", ".join(f"{slots} slots {ms:.2f}" for slots, ms in ds["paged_ms"].items())
    print(f"decode step, {args.max_seqs} rows, ms: paged by block-table width: {widths}; "
          f"static engine ({ds['static_slots']} slots in place): {ds['static_ms']:.2f}")



GOAL_ADAPTERS, GOAL_SPECULATIVE = 0.8, 1.3


def report_features(args, res, env) -> None:
    if "adapters" in res:
        a = res["adapters"]
        met = "met" if a["ratio"] >= GOAL_ADAPTERS else "NOT met"
        print(f"\nadapters ({env['date']}, {env['machine']}): {a['n']} LoRAs (r 8, q/k/v/o) "
              f"served together, requests spread over them: {a['many']['tok_s']:.0f} tokens/s "
              f"vs the base model alone {a['one']['tok_s']:.0f} tokens/s = {a['ratio']:.2f}x "
              f"(goal >= {GOAL_ADAPTERS:g}x: {met}); failed {a['many']['failed']}, TPOT p50 "
              f"{1e3 * a['many']['tpot'][0]:.0f} vs {1e3 * a['one']['tpot'][0]:.0f} ms")
    if "speculative" in res:
        print(f"\nspeculative, prompt lookup 3, γ 4 ({env['date']}, {env['machine']}):")
        print("| clients | plain tokens/s | lookup tokens/s | ratio (goal) | acceptance | "
              "tokens per forward | same greedy outputs |")
        print("|---|---|---|---|---|---|---|")
        for clients, r in res["speculative"].items():
            print(f"| {clients} | {r['plain']:.0f} | {r['spec']:.0f} | {r['ratio']:.2f}x "
                  f"(>= {GOAL_SPECULATIVE:g}x) | {r['acceptance']:.2f} | "
                  f"{r['per_forward']:.2f} | {r['same']} |")


if __name__ == "__main__":
    main()
