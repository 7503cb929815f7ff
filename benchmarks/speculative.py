"""Speculative decoding: each jaxlm draft source vs jaxlm plain decode and vs transformers'
own assisted generation, on the model the default training run produces, decoding Python.

    python benchmarks/speculative.py                       # trains the runs it needs (~4 min)
    python benchmarks/speculative.py --workdir runs/spec   # keeps the runs; reuses them next time
    python benchmarks/speculative.py --target RUN [--heads RUN] [--draft RUN]

Models (trained with `python -m jaxlm.train` unless given, into --workdir):
  * target: the default run (preset tiny, stdlib corpus, byte tokenizer, 200 steps);
  * heads:  4 Medusa heads + 2 MTP modules trained on the frozen target (--heads_only):
            its base weights are exactly the target's, so its plain decoding is the
            target's and every jaxlm engine below serves this one model;
  * draft:  a 1-layer model (d_model 128) on the same corpus and tokenizer.
The prompt is the start of a function of a stdlib file the training runs held out
(validation split), ~400 bytes; batch 1, greedy, --new-tokens new tokens.

jaxlm: Engine(lm) plain, and with Speculative("lookup" | "draft" | "medusa" | "mtp").
Every speculative output is checked equal to plain greedy's (they are exact).
transformers: the target and the draft exported with to_hf, loaded in float32, then
model.generate plain, with prompt_lookup_num_tokens=γ (max_matching_ngram_size=3, like
jaxlm's ngram=3), and with assistant_model=draft at γ drafts per round (constant
schedule) and at transformers' own defaults (20 drafts, confidence threshold 0.4); the
jaxlm draft source is compared with the faster of those two. transformers has no Medusa
and runs MTP only for its DeepSeek-V3-style checkpoints, so those have no equivalent.

tokens/s = new tokens / wall time of one generate call (prompt processing included on both
sides). Rounds alternate every configuration, and each ratio is the median of per-round
ratios (this kind of shared VM swings ±20% within minutes). Acceptance: jaxlm's is
accepted drafts / (rounds × γ); transformers' (counted from its candidate generator) is
accepted / proposed, where a round may propose fewer than γ (lookup without a match, the
assistant stopping below its confidence threshold). tokens/forward: new tokens per
verifying target forward. round cost: the wall time of one draft + verify round in plain
decode steps of the same library, so speedup over plain ≈ tokens/forward / round cost.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import machine

GOAL_VS_PLAIN, GOAL_VS_HF = 2.0, 1.5
QUIET = ["--progress", "false", "--plot", "false", "--sample_tokens", "0"]
DRAFT_MODEL = ["--model.n_layers", "1", "--model.d_model", "128", "--model.ffn_dim", "384",
               "--model.n_heads", "2", "--model.n_kv_heads", "1"]
MEDUSA, MTP = 4, 2


# Runs ----------------------------------------------------------------------------------
def _trained(run_dir: str) -> bool:
    ckpts = os.path.join(run_dir, "checkpoints")
    return (os.path.isfile(os.path.join(run_dir, "run.json")) and os.path.isdir(ckpts)
            and any(name.isdigit() for name in os.listdir(ckpts)))


def train_run(run_dir: str, flags: list[str], what: str) -> str:
    """run_dir, trained with `python -m jaxlm.train --run_dir run_dir *flags` unless it
    already holds a checkpoint."""
    if _trained(run_dir):
        print(f"{what}: reusing {run_dir}", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "jaxlm.train", "--run_dir", run_dir, *flags, *QUIET]
    print(f"{what}: python -m jaxlm.train " + " ".join(cmd[3:]), flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training the {what} failed (exit {done.returncode}):\n"
                 f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    val = [line for line in done.stdout.splitlines() if line.startswith("validation loss")]
    print(f"  {time.perf_counter() - t:.0f} s" + (f", {val[-1]}" if val else "")
          + _head_losses(run_dir), flush=True)
    return run_dir


def _head_losses(run_dir: str) -> str:
    """The last logged training cross-entropies of the Medusa / MTP heads (a heads-only
    run's validation loss is its frozen base's), as text; "" when there are none."""
    import json
    last = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                if any(k.startswith(("medusa_ce/", "mtp_ce/")) for k in record):
                    last = record
    except (OSError, ValueError):
        return ""
    heads = {k: v for k, v in last.items() if k.startswith(("medusa_ce/", "mtp_ce/"))}
    return ("; last train CE " + ", ".join(f"{k} {v:.2f}" for k, v in heads.items())
            if heads else "")


def draft_flags(target: str) -> list[str]:
    """The draft's training flags: the target's corpus and tokenizer, a small model."""
    from jaxlm.model.io.runs import read_run_file
    meta = read_run_file(target)
    if meta.get("heads_only") or meta.get("peft"):
        meta = read_run_file(meta["base"]["path"])
    corpus = meta.get("train", {}).get("corpus", "stdlib")
    tok = meta["tokenizer"]
    if tok != "byte" and not os.path.isabs(tok):
        tok = os.path.join(os.path.abspath(target), tok)
    return ["--corpus", corpus, "--tokenizer", tok, *DRAFT_MODEL]


def prepare_runs(args, work: str) -> tuple[str, str, str]:
    """(target, heads, draft) run directories, training what was not given."""
    target = args.target or train_run(os.path.join(work, "target"), [], "target")
    heads = args.heads
    if heads is None:
        from jaxlm.model.io.runs import read_run_file
        cfg = read_run_file(target)["model"]
        if cfg.get("medusa_heads", 0) >= MEDUSA and cfg.get("mtp_depth", 0) >= MTP:
            heads = target
        else:
            heads = train_run(os.path.join(work, "heads"),
                              ["--init", os.path.abspath(target), "--heads_only",
                               "--medusa_heads", str(MEDUSA), "--mtp_depth", str(MTP),
                               "--steps", "200"], "Medusa + MTP heads")
    draft = args.draft or train_run(os.path.join(work, "draft"), draft_flags(target), "draft")
    return target, heads, draft


def load(run_dir: str):
    import absl.logging  # orbax warns about read-only managers on every restore
    absl.logging.set_verbosity(absl.logging.ERROR)
    from jaxlm.model.io.runs import load_run
    lm, tokenizer, _ = load_run(run_dir)
    return lm, tokenizer


def python_prompt(n_bytes: int = 400) -> tuple[str, str]:
    """(name, text): the first ~n_bytes (whole lines) of the first function of the first
    stdlib file in the training runs' validation split that has one at least that long."""
    import ast
    import sysconfig
    from jaxlm.train.data import _held_out, stdlib_files
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_files():
        rel = os.path.relpath(path, root)
        if not _held_out(rel, 0.05):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                text = ast.get_source_segment(source, node, padded=True) or ""
                if len(text) >= 2 * n_bytes and text.isascii():
                    cut = text.rfind("\n", 0, n_bytes) + 1
                    return f"{rel}:{node.lineno} {node.name}", text[:cut]
    fallback = inspect.getsource(inspect.getmembers)
    return "inspect.getmembers", fallback[:fallback.rfind("\n", 0, n_bytes) + 1]


# transformers ------------------------------------------------------------------------------
def hf_models(target_lm, draft_lm, work: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from jaxlm.model.build import with_heads
    transformers.logging.set_verbosity_error()  # deprecation notes from assisted generate
    transformers.logging.disable_progress_bar()
    from jaxlm.model.io import to_hf
    torch.set_num_threads(os.cpu_count())
    out = []
    for name, lm in (("target", target_lm), ("draft", draft_lm)):
        path = os.path.join(work, f"hf-{name}")
        to_hf(with_heads(lm, 0, 0), path)  # Medusa / MTP heads have no HF Llama tensors
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # nothing may stop early
        model.generation_config.pad_token_id = 0
        out.append(model)
    return out


class HFCounts:
    """Rounds, proposed and accepted drafts of transformers' assisted generation, read
    from what generate passes its candidate generator after each verification:
    update_candidate_strategy(input_ids, scores [b, proposed+1, v], num_matches)."""

    def __init__(self):
        self.rounds = self.proposed = self.accepted = 0

    @contextlib.contextmanager
    def recording(self):
        from transformers.generation import candidate_generator as cg
        classes = [cg.AssistedCandidateGenerator, cg.PromptLookupCandidateGenerator]
        saved = {c: c.__dict__.get("update_candidate_strategy") for c in classes}
        counts = self

        def wrap(original):
            def update(gen, input_ids, scores, num_matches):
                counts.rounds += 1
                counts.proposed += scores.shape[1] - 1
                counts.accepted += int(num_matches)
                return original(gen, input_ids, scores, num_matches)
            return update

        for c in classes:
            c.update_candidate_strategy = wrap(c.update_candidate_strategy)
        try:
            yield self
        finally:
            for c, f in saved.items():
                if f is None:
                    del c.update_candidate_strategy
                else:
                    c.update_candidate_strategy = f

    def stats(self, new_tokens: int) -> dict:
        return {"rounds": self.rounds,
                "acceptance_rate": self.accepted / max(self.proposed, 1),
                "tokens_per_forward": new_tokens / max(self.rounds, 1)}


def hf_generate(model, prompt: list[int], n: int, **kw):
    import torch
    x = torch.tensor([prompt], dtype=torch.long)
    counts = HFCounts()
    with torch.inference_mode(), counts.recording():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, **kw)
    return out[0, len(prompt):].tolist(), (counts.stats(n) if counts.rounds else None)


# The benchmark ------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", metavar="RUN", help="target run (default: train the default "
                   "run into --workdir)")
    p.add_argument("--heads", metavar="RUN", help="the target with >= 4 Medusa heads and "
                   ">= 2 MTP modules (default: the target if it has them, else train them)")
    p.add_argument("--draft", metavar="RUN", help="draft model run (default: train one)")
    p.add_argument("--workdir", metavar="DIR", help="where runs and HF exports go (default: "
                   "a temporary folder, removed afterwards)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--spec-tokens", type=int, default=4, help="γ, drafts per verification")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)

    print(f"# speculative decoding benchmark  {datetime.datetime.now():%Y-%m-%d %H:%M}  "
          f"{machine()}", flush=True)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(work, exist_ok=True)
        results = run(args, work)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return results


def run(args, work: str) -> dict:
    from jaxlm.infer import Engine, Speculative
    target_dir, heads_dir, draft_dir = prepare_runs(args, work)
    lm, tokenizer = load(heads_dir)
    draft_lm, draft_tok = load(draft_dir)
    if draft_lm.cfg.vocab_size != lm.cfg.vocab_size or draft_tok.spec != tokenizer.spec:
        sys.exit(f"the draft's tokenizer/vocabulary ({draft_tok.spec}, "
                 f"{draft_lm.cfg.vocab_size}) is not the target's ({tokenizer.spec}, "
                 f"{lm.cfg.vocab_size})")
    g, n = args.spec_tokens, args.new_tokens
    where, text = python_prompt()
    prompt = tokenizer.encode(text)
    print(f"target {lm.cfg.n_layers} layers d_model {lm.cfg.d_model}, Medusa heads "
          f"{lm.cfg.medusa_heads}, MTP depth {lm.cfg.mtp_depth}; draft {draft_lm.cfg.n_layers} "
          f"layer(s) d_model {draft_lm.cfg.d_model}; prompt {where}: {len(prompt)} tokens; "
          f"{n} new tokens, batch 1, greedy, γ={g}", flush=True)

    engines = {
        "jaxlm plain": Engine(lm),
        "jaxlm lookup": Engine(lm, speculative=Speculative("lookup", n_draft=g, ngram=3)),
        "jaxlm draft": Engine(lm, speculative=Speculative("draft", n_draft=g, draft=draft_lm)),
        "jaxlm medusa": Engine(lm, speculative=Speculative(
            "medusa", n_draft=min(g, lm.cfg.medusa_heads))),
        "jaxlm mtp": Engine(lm, speculative=Speculative("mtp", n_draft=min(g, lm.cfg.mtp_depth))),
    }
    draft_engine = Engine(draft_lm)
    runs = {name: (lambda e=e: (e.generate([prompt], max_new_tokens=n)[0], e.speculative_stats))
            for name, e in engines.items()}
    if not args.skip_hf:
        hf_target, hf_draft = hf_models(lm, draft_lm, work)
        hf_draft.generation_config.num_assistant_tokens = 20
        hf_draft.generation_config.num_assistant_tokens_schedule = "constant"

        def assisted(k, threshold):
            def go():
                gc = hf_draft.generation_config
                gc.num_assistant_tokens, gc.assistant_confidence_threshold = k, threshold
                return hf_generate(hf_target, prompt, n, assistant_model=hf_draft)
            return go
        runs.update({
            "transformers plain": lambda: hf_generate(hf_target, prompt, n),
            "transformers lookup": lambda: hf_generate(
                hf_target, prompt, n, prompt_lookup_num_tokens=g, max_matching_ngram_size=3),
            "transformers assisted": assisted(g, 0.0),
            "transformers assisted (defaults)": assisted(20, 0.4),
        })

    # Warm-up (compiles), exactness, the draft's own cost per token.
    t = time.perf_counter()
    outputs, stats = {}, {}
    for name, fn in runs.items():
        outputs[name], stats[name] = fn()
    print(f"compiled / warmed up in {time.perf_counter() - t:.0f} s", flush=True)
    plain = outputs["jaxlm plain"]
    assert len(plain) == n, f"jaxlm plain produced {len(plain)} tokens, not {n}"
    for name, out in outputs.items():
        if name.startswith("jaxlm"):
            assert out == plain, f"{name} differs from plain greedy decoding"
    print(f"exact: every jaxlm source's output equals plain greedy decoding ({n} tokens):\n"
          f"  prompt ends  {text[-120:]!r}\n  continuation {tokenizer.decode(plain)!r}")
    if not args.skip_hf:
        hf_plain = outputs["transformers plain"]
        agree = np.mean(np.asarray(hf_plain) == np.asarray(plain))
        same = [k for k in outputs if k.startswith("transformers") and outputs[k] == hf_plain]
        print(f"transformers plain vs jaxlm plain: {100 * agree:.0f}% of tokens equal; "
              f"transformers outputs equal to its plain greedy: {len(same)}/"
              f"{sum(k.startswith('transformers') for k in outputs)}")
    draft_engine.generate([prompt], max_new_tokens=n)

    times = {name: [] for name in runs}
    own = {"target": [], "draft": []}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            out, st = fn()
            times[name].append(time.perf_counter() - t)
            if st is not None:
                stats[name] = st
            if name.startswith("jaxlm"):
                assert out == plain, f"{name} differs from plain greedy decoding"
        for key, e in (("target", engines["jaxlm plain"]), ("draft", draft_engine)):
            t = time.perf_counter()
            e.generate([prompt], max_new_tokens=n)
            own[key].append(time.perf_counter() - t)
    cost = statistics.median(d / t for d, t in zip(own["draft"], own["target"]))
    print(f"draft model: {cost:.2f}x the target's plain generate time "
          f"({1 / cost:.1f}x cheaper per token, prefill included)")

    def ratio(a, b_names):
        """median over rounds of tokens/s(a) / the best tokens/s among b_names that round."""
        return statistics.median(min(times[b][i] for b in b_names) / times[a][i]
                                 for i in range(args.reps))

    hf_equiv = {"jaxlm lookup": ["transformers lookup"],
                "jaxlm draft": ["transformers assisted", "transformers assisted (defaults)"],
                "jaxlm plain": ["transformers plain"]}
    rows = []
    for name in runs:
        r = dict(name=name, tps=n / statistics.median(times[name]),
                 best=n / min(times[name]), stats=stats[name])
        plain_name = name.split()[0] + " plain"
        if stats[name] and plain_name in times:  # a verification round, in plain steps
            r["round"] = statistics.median(
                (times[name][i] / stats[name]["rounds"]) / (times[plain_name][i] / n)
                for i in range(args.reps))
        if name.startswith("jaxlm") and name != "jaxlm plain":
            r["vs_plain"] = ratio(name, ["jaxlm plain"])
        if name.startswith("transformers") and name != "transformers plain":
            r["vs_plain"] = ratio(name, ["transformers plain"])
        if name in hf_equiv and not args.skip_hf:
            r["vs_hf"] = ratio(name, hf_equiv[name])
        rows.append(r)
    print_table(rows, args, g, n, len(prompt), where)

    spec_rows = [r for r in rows if r["name"].startswith("jaxlm") and "vs_plain" in r]
    best = max(spec_rows, key=lambda r: r["vs_plain"])
    ok1 = best["vs_plain"] >= GOAL_VS_PLAIN
    print(f"goal: best source >= {GOAL_VS_PLAIN:g}x jaxlm plain decode: "
          f"{'met' if ok1 else 'NOT met'} ({best['name']}: {best['vs_plain']:.2f}x; the "
          f"highest tokens/forward, {max(r['stats']['tokens_per_forward'] for r in spec_rows):.2f}"
          f", bounds any source's speedup, a round costing at least one plain step)")
    if not args.skip_hf:
        for r in rows:
            if r["name"] in ("jaxlm lookup", "jaxlm draft"):
                ok = r["vs_hf"] >= GOAL_VS_HF
                print(f"goal: {r['name']} >= {GOAL_VS_HF:g}x transformers' equivalent: "
                      f"{'met' if ok else 'NOT met'} ({r['vs_hf']:.2f}x)")
        print("goal: jaxlm medusa / mtp >= 1.5x transformers' equivalent: n/a (transformers "
              "has no Medusa decoding, and MTP drafting only for DeepSeek-V3-style "
              "checkpoints, which to_hf writes for deepseek_v3 models only)")
    return {r["name"]: r for r in rows}


def print_table(rows, args, g, n, prompt_len, where) -> None:
    print()
    print(f"Speculative decoding, {datetime.date.today()}, {machine()}, "
          f"{os.getloadavg()[0]:.1f} load average")
    print(f"Default training run's model (tiny preset, 200 steps, byte tokenizer), Python "
          f"source prompt ({where}, {prompt_len} tokens), batch 1, greedy, {n} new tokens, "
          f"γ={g}, median of {args.reps} interleaved rounds; prefill included.")
    print()
    print("| decoding | tokens/s (best) | vs own plain | vs transformers' equivalent "
          "| acceptance | tokens/forward | round cost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stats"]
        vs_hf = r.get("vs_hf")
        if not args.skip_hf and r["name"] in ("jaxlm medusa", "jaxlm mtp"):
            vs_hf_s = "n/a (none)"
        else:
            vs_hf_s = "" if vs_hf is None else f"{vs_hf:.2f}x"
        print(f"| {r['name']} | {r['tps']:.0f} ({r['best']:.0f}) | "
              + ("" if "vs_plain" not in r else f"{r['vs_plain']:.2f}x") + f" | {vs_hf_s} | "
              + (f"{100 * st['acceptance_rate']:.0f}% | {st['tokens_per_forward']:.2f} | "
                 f"{r['round']:.2f} |" if st else
                 " | 1.00 | 1.00 |" if "plain" in r["name"] else "n/a | n/a | n/a |"))
    print()
    print("round cost: wall time per verification round in plain decode steps of the same "
          "library (plain generate time / new tokens, prefill included). A source's speedup "
          "over plain is about tokens/forward / round cost, so tokens/forward bounds it.")


if __name__ == "__main__":
    main()
