"""Fine-tuning and serving adapters: jaxlm vs transformers + PEFT + torch, side by side.

    python benchmarks/peft.py                   # both parts
    python benchmarks/peft.py --part train --rounds 5
    python benchmarks/peft.py --part decode

train: one optimizer step (forward, backward, AdamW, global-norm clipping) of
  * jaxlm LoRA      (jaxlm.train.step.make_train_step over SplitModel(trainable=Adapter):
                     the base frozen, the optimizer over the adapter alone),
  * jaxlm full      (the same step over every parameter),
  * torch PEFT LoRA (PeftModel(LlamaForCausalLM, LoraConfig) + torch.optim.AdamW over its
                     trainable parameters),
on the same Llama-style model (hidden 512, 8 layers, 8 heads, 2 KV heads, FFN 1408, vocab
32000, float32: created in transformers and loaded into jaxlm with from_hf), the same
batch and the same LoRA (r=16, alpha=32, q/k/v/o). Rounds alternate the sides (a load
change on this shared VM hits all of them); each side's fastest round counts and the
median is printed too. Memory: the optimizer state's bytes (exact, from the arrays) and
each side's peak resident memory, measured in a fresh process that runs only that side.

decode: a batch of 8 rows over 4 LoRA adapters (2 rows each) in one jaxlm Engine vs the
4 adapters served one after another as separate batches of 2 (each its own engine with
the LoRA merged into the weights: the fastest way to serve one adapter). Throughput =
new tokens / wall time of greedy generation, prompt 32, 64 new tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder leads sys.path and "peft" would import this file
# instead of Hugging Face's package: move the folder to the end (common.py is still found).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import MODEL, machine, trainer  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA = 16, 32
SIDES = ("jaxlm LoRA", "jaxlm full", "torch PEFT LoRA")


def hf_base(path: str) -> None:
    """A random-init LlamaForCausalLM saved to path (both sides load these weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL, tie_word_embeddings=False)).save_pretrained(path)


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size"))


# Training ----------------------------------------------------------------------------
def jaxlm_step(base_dir: str, tokens: np.ndarray, lora: bool):
    """(run(n) → loss, optimizer-state bytes, trainable count) for the jaxlm trainer's
    step over the LoRA adapter alone or over every parameter."""
    from jaxlm.model import build
    from jaxlm.model import peft as P
    from jaxlm.model.io import from_hf
    from jaxlm.train.step import count_params
    lm = from_hf(base_dir)
    if lora:
        lm = P.attach(lm, P.LoraSpec(r=RANK, alpha=ALPHA, targets=TARGETS))
        model = build.SplitModel(lm, trainable=P.Adapter)
    else:
        model = build.SplitModel(lm)
    run, state = trainer(model, tokens, lr=1e-3)
    return run, nbytes(state.opt_state), count_params(state.params)


def torch_step(base_dir: str, tokens: np.ndarray, threads: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA,
                                             target_modules=list(TARGETS), lora_dropout=0.0,
                                             task_type="CAUSAL_LM")).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.tensor(tokens, dtype=torch.long)

    def run(n):
        for _ in range(n):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.loss.item()

    def state_bytes():
        return sum(v.numel() * v.element_size() for s in opt.state.values()
                   for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    return run, state_bytes, sum(p.numel() for p in trainable)


def make_side(name: str, base_dir: str, tokens, threads: int):
    if name == "torch PEFT LoRA":
        run, state_bytes, n = torch_step(base_dir, tokens, threads)
        return run, state_bytes, n
    run, opt_bytes, n = jaxlm_step(base_dir, tokens, lora=name == "jaxlm LoRA")
    return run, (lambda: opt_bytes), n


def peak_rss_of(side: str, base_dir: str, batch: int, seq: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads the model and runs 3
    steps of one side only."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", side, "--base", base_dir,
                          "--batch", str(batch), "--seq", str(seq)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def train_part(args, base_dir: str, threads: int) -> None:
    tokens = np.random.default_rng(0).integers(0, MODEL["vocab_size"],
                                               (args.batch, args.seq + 1))
    sides = {name: make_side(name, base_dir, tokens, threads) for name in SIDES}
    first = {name: run(2) for name, (run, _, _) in sides.items()}  # compile / warm up
    times = {name: [] for name in SIDES}
    for _ in range(args.rounds):
        for name, (run, _, _) in sides.items():
            t = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
    total = sides["jaxlm full"][2]
    print(f"train: batch {args.batch}×{args.seq}, LoRA r={RANK} alpha={ALPHA} on "
          f"{','.join(TARGETS)}; loss after 2 steps: "
          + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    rate = {}
    for name, (_, state_bytes, n) in sides.items():
        best, med = min(times[name]), statistics.median(times[name])
        rate[name] = 1 / best
        rss = peak_rss_of(name, base_dir, args.batch, args.seq) if args.memory else float("nan")
        print(f"{name:>16}: {best * 1e3:8.1f} ms/step (median {med * 1e3:.1f})  "
              f"trainable {n:>11,} ({n / total:7.3%})  optimizer state "
              f"{state_bytes() / 2**20:8.2f} MiB  peak RSS {rss:8.0f} MiB")
    opt_ratio = sides["jaxlm LoRA"][1]() / sides["jaxlm full"][1]()
    print(f"ratio jaxlm LoRA / torch PEFT LoRA: {rate['jaxlm LoRA'] / rate['torch PEFT LoRA']:.2f}× "
          f"steps/s (goal ≥ 1.5×); jaxlm LoRA / jaxlm full: "
          f"{rate['jaxlm LoRA'] / rate['jaxlm full']:.2f}×; optimizer memory LoRA/full "
          f"{opt_ratio:.5f} vs trainable fraction {sides['jaxlm LoRA'][2] / total:.5f}")


def memory_of(args) -> None:
    tokens = np.random.default_rng(0).integers(0, MODEL["vocab_size"],
                                               (args.batch, args.seq + 1))
    run, _, _ = make_side(args.memory_of, args.base, tokens, os.cpu_count() or 1)
    run(3)
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to this program alone;
    getrusage's ru_maxrss survives fork + exec, so a child started by a big parent would
    report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Multi-adapter decode ----------------------------------------------------------------
def decode_part(args, base_dir: str) -> None:
    from flax import nnx

    from jaxlm.infer import Engine
    from jaxlm.model import peft as P
    from jaxlm.model.io import from_hf
    base = from_hf(base_dir)
    adapted = []
    for i, (r, targets) in enumerate([(8, ("q_proj", "v_proj")), (16, TARGETS),
                                      (4, ("o_proj",)), (8, ("q_proj", "k_proj"))]):
        lm = P.attach(nnx.merge(*nnx.split(base)), P.LoraSpec(r=r, alpha=2 * r,
                                                              targets=targets), seed=i)
        for _, lora in P.loras(lm):   # trained-looking adapters: B ≠ 0
            lora.b.set_value(0.02 * jax.random.normal(jax.random.key(i), lora.b[...].shape))
        adapted.append(lm)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, MODEL["vocab_size"], 32).tolist() for _ in range(8)]
    ids = [i // 2 for i in range(8)]
    n = args.new_tokens
    multi = Engine(base, adapters=adapted)
    single = [Engine(P.merge(nnx.clone(lm)), ) for lm in adapted]

    def run_multi():
        return multi.generate(prompts, max_new_tokens=n, adapter_ids=ids)

    def run_single():
        out = []
        for j, engine in enumerate(single):
            out += engine.generate(prompts[2 * j:2 * j + 2], max_new_tokens=n)
        return out
    same = run_multi() == run_single()   # also compiles both
    times = {"multi": [], "separate": []}
    for _ in range(args.rounds):
        for name, f in (("multi", run_multi), ("separate", run_single)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    tokens = 8 * n
    best = {k: tokens / min(v) for k, v in times.items()}
    print(f"decode: 8 rows over 4 LoRA adapters (ranks 8/16/4/8), prompt 32, {n} new tokens, "
          f"greedy; same tokens both ways: {same}")
    for name in times:
        print(f"{name:>9}: {best[name]:8.1f} tokens/s (best of {args.rounds}; median "
              f"{tokens / statistics.median(times[name]):.1f})")
    print(f"ratio one mixed batch / separate batches: {best['multi'] / best['separate']:.2f}× "
          f"(goal ≥ 2×)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("train", "decode", "both"), default="both")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure each side's peak RSS in a fresh process")
    ap.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        return memory_of(args)
    threads = os.cpu_count() or 1
    print(f"{datetime.date.today()} · {machine()} · float32")
    with tempfile.TemporaryDirectory() as base_dir:
        hf_base(base_dir)
        if args.part in ("train", "both"):
            train_part(args, base_dir, threads)
        if args.part in ("decode", "both"):
            decode_part(args, base_dir)


if __name__ == "__main__":
    main()
