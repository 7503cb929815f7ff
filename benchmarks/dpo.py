"""DPO training: jaxlm vs TRL's DPOTrainer (torch, CPU), side by side in one run.

    python benchmarks/dpo.py                      # full and LoRA DPO, both sides, + memory
    python benchmarks/dpo.py --steps 5 --rounds 7 --batch 4 --pairs 64   # the defaults

What one step is, on both sides: a DPO (sigmoid loss, β = 0.1) optimizer step over B
preference pairs (B = 4: 2B = 8 sequences, chosen and rejected in one forward pass):
forward, backward, global-norm clipping at 1, AdamW (β = (0.9, 0.95), weight decay 0.1,
learning rate 1e-5: TRL's constant, jaxlm's a cosine over 10,000 steps, as good as
constant here), no gradient accumulation, the reference log-probs precomputed once before
training (TRL: DPOConfig(precompute_ref_log_probs=True); jaxlm: reference="precomputed"),
so no reference forward pass in the step. TRL's own defaults that would change the work
are overridden: bf16=True (float32 here), gradient_checkpointing=True (off: jaxlm's
model recomputes nothing either), a random sampler (sequential here). Two configurations:
  full  every weight trained;
  LoRA  r=16, alpha=32, dropout 0 on q/k/v/o_proj (TRL: peft_config=LoraConfig; jaxlm:
        peft.attach + SplitModel(trainable=Adapter)), the base frozen.

Model: a small Llama (hidden 256, 4 layers, 4 query / 2 KV heads, FFN 704, vocab 8000,
untied head; smaller than common.MODEL so TRL's side finishes in minutes on 2 cores),
created once in transformers (torch.manual_seed(0)) and loaded into jaxlm with from_hf;
float32 on both sides.

Data: `pairs` random preference pairs (fixed seed): a prompt of 32–64 tokens and chosen /
rejected completions of 32–64 tokens each (the last one EOS), the same token ids on
both sides, read in the same order (pairs k·B … k·B+B−1 at step k, cycling). TRL gets
them as text over a word-level tokenizer with one word per token id; the script checks
that TRL's tokenized prompt/chosen/rejected ids equal the intended ones, and prints
whether both sides' precomputed reference log-probs agree and each side's loss at the
first and last step. Sequence lengths: jaxlm pads every row to one length, the longest
sequence rounded up to a multiple of 8 (its trainer's fixed shape: 128 positions here);
TRL pads each batch to that batch's longest sequence (~115 positions on average,
printed): less work per step for TRL, so the comparison favours TRL slightly.

Timing: each side runs in its own fresh process; each first runs 2 untimed steps
(jaxlm's compilation, torch's allocator warm-up; the reference precompute is untimed on
both sides), then `rounds` rounds of `steps` steps, the rounds alternating between the
sides (the parent tells one process at a time to run a round while the others wait), so
a load change on this shared VM hits every side. A step's time is TRL's on_step_begin →
on_step_end (a TrainerCallback; the batch's collation happens before on_step_begin and is
not counted) and jaxlm's train-step call until its results are ready (batches built
beforehand). Each side's fastest round counts; the median round is printed too. Other
work on the VM slows torch's OpenMP threads far more than XLA's (a 2-thread barrier
with a core taken away), which inflates the ratios: the 1-minute load average is printed
at the start and the end; trust runs where it stays well under the core count.

Memory: each process's peak resident memory (VmHWM) at its end, so it covers loading,
the reference precompute, compilation and training. Two more jaxlm processes run on the
same rows: LoRA SFT (the same 2B sequences per step through the ordinary next-token
step, loss on the completion tokens) and LoRA DPO with reference="adapter_off" (the
reference computed in the step from the same weights with the adapter switched off).
DPO with a precomputed or adapter-off reference keeps no second copy of the weights, so
its peak should stay within 1.1× of SFT's (the goal printed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder leads sys.path and "peft" would import
# benchmarks/peft.py instead of Hugging Face's package (TRL imports it too): move the
# folder to the end (common.py is still found).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import numpy as np  # noqa: E402

# hidden 256, 4 layers, 4 query / 2 KV heads, FFN 704, vocab 8000 (transformers names)
MODEL = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=704, max_position_embeddings=512,
             tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA = 16, 32
BETA, LR = 0.1, 1e-5
WARMUP = 2                      # untimed steps per side
PAD, EOS, UNK, FIRST = 0, 1, 2, 3   # token ids: random tokens are drawn from [FIRST, vocab)
CONFIGS = {"full DPO": ("jaxlm-full", "trl-full"), "LoRA DPO": ("jaxlm-lora", "trl-lora")}
EXTRA = ("jaxlm-lora-sft", "jaxlm-lora-off")
SIDES = ("jaxlm-full", "trl-full", "jaxlm-lora", "trl-lora") + EXTRA


# The data, the same on both sides --------------------------------------------------------
def make_pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """n (prompt, chosen, rejected) token-id lists: prompt 32–64 tokens, each completion
    32–64 tokens ending in EOS."""
    rng = np.random.default_rng(seed)
    vocab = MODEL["vocab_size"]
    out = []
    for _ in range(n):
        prompt = rng.integers(FIRST, vocab, rng.integers(32, 65)).tolist()
        chosen, rejected = (rng.integers(FIRST, vocab, rng.integers(31, 64)).tolist() + [EOS]
                            for _ in range(2))
        out.append((prompt, chosen, rejected))
    return out


def jaxlm_length(data) -> int:
    """jaxlm's positions per row: the longest sequence minus one (inputs drop the last
    token), rounded up to a multiple of 8 (train/preference.py pair_length)."""
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in data)
    return -(-(longest - 1) // 8) * 8


def trl_lengths(data, batch: int) -> list[int]:
    """The padded length TRL's collator gives each step's batch: its longest sequence."""
    return [max(len(p) + max(len(c), len(r)) for p, c, r in data[lo:lo + batch])
            for lo in range(0, len(data), batch)]


def hf_base(path: str) -> int:
    """A random-init LlamaForCausalLM saved to path (both sides load these weights);
    returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: this program's alone, unlike getrusage's
    ru_maxrss, which survives fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# A side's process: talks to the parent over stdin/stdout ---------------------------------
def report(*fields) -> None:
    print("@@", *fields, flush=True)


def command() -> str:
    return sys.stdin.readline().strip() or "quit"


def jaxlm_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from jaxlm.model import from_hf
    from jaxlm.model import peft as P
    from jaxlm.model.build import SplitModel
    from jaxlm.train import preference as PR
    from jaxlm.train.config import TrainConfig
    from jaxlm.train.step import NEXT_TOKEN, init_state, make_optimizer, make_train_step

    side, b = args.side, args.batch
    lora = side != "jaxlm-full"
    sft = side == "jaxlm-lora-sft"
    reference = "adapter_off" if side == "jaxlm-lora-off" else "precomputed"
    data = make_pairs(args.pairs)
    t = jaxlm_length(data)
    n = len(data)
    tokens = np.zeros((n, 2, t + 1), np.int32)       # PAD = 0
    mask = np.zeros((n, 2, t + 1), bool)
    for i, (p, c, r) in enumerate(data):
        for j, comp in enumerate((c, r)):
            tokens[i, j, :len(p) + len(comp)] = p + comp
            mask[i, j, len(p):len(p) + len(comp)] = True
    pairs = PR.PairSet(tokens, mask, lines=np.arange(n))

    lm = from_hf(args.dir)
    if lora:
        spec = P.LoraSpec(r=RANK, alpha=ALPHA, targets=TARGETS)
        model = SplitModel(P.attach(lm, spec, seed=0), trainable=P.Adapter)
    else:
        model = SplitModel(lm)
    common = dict(lr=LR, warmup_steps=0, steps=10_000, batch_size=b, seq_len=t, beta1=0.9,
                  beta2=0.95, weight_decay=0.1, clip_norm=1.0, seed=0)
    if sft:
        tcfg, objective = TrainConfig(**common), NEXT_TOKEN
        pairs.ref = np.zeros((n, 2), np.float32)
    else:
        tcfg = TrainConfig(task="dpo", init="x", data="x", loss="dpo", beta=BETA,
                           peft=f"lora:r={RANK}" if lora else "", reference=reference,
                           **common)
        if reference == "precomputed":   # the starting model: for LoRA its base, adapter off
            ref_lm = model.merge(model.params, adapters=False) if lora else model.merge(
                model.params)
            with tempfile.TemporaryDirectory() as run_dir:
                PR.attach_reference(run_dir, ref_lm, {"train": pairs}, batch_size=b,
                                    log=lambda *_: None)
            del ref_lm
        else:
            pairs.ref = np.zeros((n, 2), np.float32)
        objective = PR.PreferenceObjective(tcfg, reference)
    opt = make_optimizer(tcfg, model.params)
    state = init_state(tcfg, model.cfg, model.params, opt, rest=model.rest.to_pure_dict())
    step = make_train_step(model, tcfg, opt, objective=objective)

    batches = []
    for lo in range(0, n - n % b, b):
        idx = np.arange(lo, lo + b)
        batch = PR.model_batch({"tokens": pairs.tokens[idx], "mask": pairs.mask[idx],
                                "ref": pairs.ref[idx]}, accum=1)    # [1, 2b, t]
        if sft:
            batch.pop("ref_logps")
        batches.append(jax.tree.map(jnp.asarray, batch))
    holder = {"state": state, "k": 0}

    def run(steps: int) -> tuple[float, float]:
        """(seconds, last loss) of `steps` steps, each timed until its results are ready."""
        total, loss = 0.0, float("nan")
        for _ in range(steps):
            batch = batches[holder["k"] % len(batches)]
            holder["k"] += 1
            t0 = time.perf_counter()
            holder["state"], m = step(holder["state"], batch)
            jax.block_until_ready((holder["state"], m))
            total += time.perf_counter() - t0
            loss = float(m["loss"])
        return total, loss

    _, first = run(1)
    run(WARMUP - 1)
    ref_mean = float(np.mean(pairs.ref[:, 0])) if reference == "precomputed" and not sft \
        else float("nan")
    report("ready", first, ref_mean)
    while command() == "run":
        report("time", *run(args.steps))
    report("rss", peak_rss_mib())


def word_tokenizer():
    """A PreTrainedTokenizerFast whose words are token ids: "<pad>" 0, "</s>" 1 (EOS),
    "<unk>" 2, "w3" … "w7999"; whitespace split, no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(FIRST, MODEL["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def words(ids) -> str:
    return " ".join("</s>" if i == EOS else f"w{i}" for i in ids)


def trl_worker(args) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    torch.set_num_threads(os.cpu_count() or 1)
    lora = args.side == "trl-lora"
    b = args.batch
    data = make_pairs(args.pairs)
    ds = datasets.Dataset.from_dict({
        "prompt": [words(p) for p, _, _ in data],
        "chosen": [" " + words(c) for _, c, _ in data],      # ends in EOS: TRL adds none
        "rejected": [" " + words(r) for _, _, r in data]})

    class Timer(TrainerCallback):
        """Times on_step_begin → on_step_end; after the warm-up steps and after every
        `steps` timed steps, reports to the parent and waits for its next command."""
        def __init__(self):
            self.t0, self.total = 0.0, 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **k):
            self.total += time.perf_counter() - self.t0
            done = state.global_step - WARMUP
            if done < 0 or (done > 0 and done % args.steps):
                return control
            if done == 0:
                ref = float(np.mean(trainer.train_dataset["ref_chosen_logps"]))
                report("ready", trainer.first_loss, ref)
            else:
                report("time", self.total, trainer.last_loss)
            self.total = 0.0
            if command() != "run":
                control.should_training_stop = True
            return control

    class Trainer(DPOTrainer):
        first_loss = last_loss = float("nan")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = float((out[0] if return_outputs else out).detach())
            if self.first_loss != self.first_loss:
                self.first_loss = self.last_loss
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=b, gradient_accumulation_steps=1,
            max_steps=WARMUP + args.rounds * args.steps, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
            adam_epsilon=1e-8, weight_decay=0.1, max_grad_norm=1.0, beta=BETA,
            loss_type=["sigmoid"], precompute_ref_log_probs=True,
            max_length=jaxlm_length(data) + 1,   # truncates nothing
            gradient_checkpointing=False,        # TRL's default is True; jaxlm recomputes none
            bf16=False, fp16=False,              # TRL's default is bf16=True: float32 here
            use_cpu=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[],
            disable_tqdm=True, seed=0)
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                 lora_dropout=0.0, task_type="CAUSAL_LM") if lora else None
        model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
        trainer = Trainer(model=model, args=config, train_dataset=ds,
                          processing_class=word_tokenizer(), peft_config=peft_config,
                          callbacks=[Timer()])
        got = trainer.train_dataset
        for col, k in (("prompt_ids", 0), ("chosen_ids", 1), ("rejected_ids", 2)):
            if got[col] != [d[k] for d in data]:
                raise SystemExit(f"TRL tokenized {col} differently from the intended ids")
        trainer.train()
    report("rss", peak_rss_mib())


# The parent ----------------------------------------------------------------------------
class Side:
    """One side's process: started at once, then driven a round at a time."""

    def __init__(self, name: str, args, base_dir: str, log_dir: str):
        self.name = name
        self.log = os.path.join(log_dir, f"{name}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--dir", base_dir,
               "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--batch", str(args.batch), "--pairs", str(args.pairs)]
        env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)
        self.times: list[float] = []
        self.loss = float("nan")

    def read(self, kind: str) -> list[float]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                with open(self.log) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{self.name} exited (rc {self.proc.wait()}):\n{tail}")
            if line.startswith("@@ "):
                word, *rest = line.split()[1:]
                if word != kind:
                    raise RuntimeError(f"{self.name}: expected {kind}, got {line!r}")
                return [float(x) for x in rest]

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def round(self, steps: int) -> None:
        self.send("run")
        seconds, self.loss = self.read("time")
        self.times.append(seconds / steps)

    def finish(self) -> float:
        self.send("quit")
        (rss,) = self.read("rss")
        self.proc.wait()
        return rss


def load() -> str:
    """The 1-minute load average (other work on this VM slows the sides down)."""
    return f"{os.getloadavg()[0]:.1f}"


def main_run(args) -> None:
    import jax

    from common import machine
    data = make_pairs(args.pairs)
    t, trl = jaxlm_length(data), trl_lengths(data, args.batch)
    print(f"{datetime.date.today()} · {machine()} · float32")
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as logs:
        n_params = hf_base(base_dir)
        print(f"model: Llama hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} "
              f"layers, {MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} "
              f"KV heads, FFN {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']} "
              f"({n_params / 1e6:.2f}M parameters), float32 both sides")
        print(f"data: {args.pairs} random pairs, prompt 32–64 tokens, completions 32–64; "
              f"{args.batch} pairs ({2 * args.batch} rows) per step; DPO β={BETA}, AdamW "
              f"lr {LR:g}, precomputed reference; LoRA r={RANK} alpha={ALPHA} on "
              f"{','.join(TARGETS)}")
        print(f"positions per row: jaxlm {t} (every step); TRL its batch's longest − 1: mean "
              f"{statistics.mean(trl) - 1:.1f} (min {min(trl) - 1}, max {max(trl) - 1})")
        print(f"timing: {WARMUP} untimed steps, then {args.rounds} alternating rounds × "
              f"{args.steps} steps per side, each side in its own process; torch threads "
              f"{os.cpu_count()}, jax {jax.default_backend()}")
        start, load_start = time.perf_counter(), load()
        sides = {}
        try:
            for name in SIDES:
                sides[name] = Side(name, args, base_dir, logs)
            ready = {name: s.read("ready") for name, s in sides.items()}
            print(f"(all sides ready after {time.perf_counter() - start:.0f} s: loading, "
                  f"reference precompute, compilation, {WARMUP} steps)")
            for _ in range(args.rounds):
                for s in sides.values():
                    s.round(args.steps)
            rss = {name: s.finish() for name, s in sides.items()}
        finally:
            for s in sides.values():
                if s.proc.poll() is None:
                    s.proc.kill()
                    s.proc.wait()
        print()
        for config, (jx, tr) in CONFIGS.items():
            print(config)
            for name in (jx, tr):
                s, (first, ref) = sides[name], ready[name]
                best, med = min(s.times), statistics.median(s.times)
                print(f"  {name:>10}: {1 / best:6.2f} steps/s ({best * 1e3:7.1f} ms/step; "
                      f"median {1 / med:6.2f} steps/s)  peak RSS {rss[name]:6.0f} MiB  loss "
                      f"step 1 {first:.4f}, last {s.loss:.4f}  mean ref log-prob (chosen) "
                      f"{ref:.3f}")
            ratio = min(sides[tr].times) / min(sides[jx].times)
            med = statistics.median(sides[tr].times) / statistics.median(sides[jx].times)
            gap = abs(ready[jx][1] - ready[tr][1])
            print(f"  same reference log-probs both sides: {gap < 1e-3 * abs(ready[tr][1])} "
                  f"(|Δ mean| {gap:.1e})")
            print(f"  jaxlm / TRL: {ratio:.2f}× steps/s (goal ≥ 1.5×; median rounds "
                  f"{med:.2f}×), peak RSS {rss[jx] / rss[tr]:.2f}×")
        print("jaxlm LoRA memory on the same rows")
        for name, what in (("jaxlm-lora-sft", "LoRA SFT (next-token)"),
                           ("jaxlm-lora", "LoRA DPO, reference precomputed"),
                           ("jaxlm-lora-off", "LoRA DPO, reference adapter_off")):
            best, med = min(sides[name].times), statistics.median(sides[name].times)
            print(f"  {what:>32}: peak RSS {rss[name]:6.0f} MiB  {1 / best:6.2f} steps/s "
                  f"(median {1 / med:.2f})")
        for name in ("jaxlm-lora", "jaxlm-lora-off"):
            print(f"  {name} / jaxlm-lora-sft peak RSS: "
                  f"{rss[name] / rss['jaxlm-lora-sft']:.2f}× (goal ≤ 1.1×)")
        print(f"(total {time.perf_counter() - start:.0f} s; load average {load_start} at the "
              f"start, {load()} at the end)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--pairs", type=int, default=64, help="distinct pairs (cycled)")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pairs % args.batch:
        ap.error("--pairs must be a multiple of --batch (both sides cycle whole batches)")
    if args.side is None:
        return main_run(args)
    (trl_worker if args.side.startswith("trl") else jaxlm_worker)(args)


if __name__ == "__main__":
    main()
