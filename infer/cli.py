"""`python -m jaxlm.infer`: generate from a trainer run or a local HF directory.

    python -m jaxlm.infer --checkpoint runs/tiny --prompt "Once upon a time" --max-new-tokens 64
    python -m jaxlm.infer --hf ~/models/Qwen3-0.6B --prompt "Hi" --temperature 0.7 --top-p 0.9
    python -m jaxlm.infer --hf DIR --prompt-ids 1,2,3 --bench
    python -m jaxlm.infer --hf DIR --prompt "Hi" --mesh tensor=8    # one host, 8 devices
    python -m jaxlm.infer --hf DIR --adapter PEFT_DIR --prompt "Hi" [--merge]
    python -m jaxlm.infer --checkpoint RUN --prompt "def " --prompt-lookup 3 --spec-tokens 4
    python -m jaxlm.infer --checkpoint RUN --draft SMALL_RUN_OR_HF_DIR --bench
    python -m jaxlm.infer --checkpoint RUN --medusa | --mtp     # the model's own heads
    python -m jaxlm.infer --hf DIR --adapter A --adapter B --prompt-ids 1,2 --prompt-ids 3 \
        --prompt-ids 4,5 --adapter-ids 0,1,-1          # one batch, a LoRA/prefix/... per row

--adapter serves PEFT adapter directories (LoRA, prefix tuning, bottleneck): one adapter
for every row, or several in one batch with --adapter-ids (one id per prompt, --prompt
ones first, then --prompt-ids; -1 = the base model; default: every row adapter 0). A
--checkpoint of a PEFT run serves its trained adapter.

Speculative decoding (exact: greedy output is plain greedy's, sampled output has the
target's distribution): --draft (a smaller model with the same vocabulary), --prompt-lookup
N (n-gram lookup in the prompt and output), --medusa or --mtp (the model's own heads),
each drafting --spec-tokens tokens per target forward; --bench adds the acceptance rate
and tokens per target forward.

Text streams to the terminal as it is produced (the decode loop runs in chunks of
--chunk steps). --bench prints prefill and decode tokens/s, time to first token and the
cache's memory instead. Bad input ends with one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DESCRIPTION = "Generate text with a jaxlm model (trainer run directory or HF directory)."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxlm.infer", description=DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a run directory written by "
                     "`python -m jaxlm.train` (latest step unless --step)")
    src.add_argument("--hf", metavar="DIR", help="a local Hugging Face model directory "
                     "(config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--adapter", action="append", metavar="PEFT_DIR",
                   help="a PEFT adapter directory (repeat to serve several in one batch)")
    p.add_argument("--adapter-ids", metavar="IDS", help="each prompt's adapter, e.g. 0,1,-1 "
                   "(an index into the --adapter list; -1: the base model; default: all 0)")
    p.add_argument("--merge", action="store_true",
                   help="fold a single LoRA adapter into the weights (faster decode)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="a prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", metavar="IDS", help="comma-separated stop token ids "
                   "(default: the HF config's eos_token_id, if any)")
    p.add_argument("--max-len", type=int, help="cache slots per row (prompt + new tokens); "
                   "default: the model's max_position")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's)")
    add_quant_args(p)
    p.add_argument("--save-quantized", metavar="DIR", help="with --quantize: also save the "
                   "quantized model as a run directory (load it later with --checkpoint "
                   "DIR; it is not quantized again)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps between prints")
    p.add_argument("--bench", action="store_true",
                   help="print prefill/decode tokens/s, time to first token, cache memory")
    add_spec_args(p)
    add_mesh_arg(p)
    p.add_argument("--coordinator", default="", metavar="HOST:PORT",
                   help="multi-host: process 0's address (or 'auto'); every host runs the "
                   "same command with its own --process-id")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    return p.parse_args(argv)


def add_spec_args(p) -> None:
    """The speculative-decoding flags (the server takes them too)."""
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", metavar="RUN_OR_HF_DIR", help="speculative decoding with "
                      "this smaller model (same vocabulary) drafting")
    spec.add_argument("--prompt-lookup", type=int, metavar="N", help="speculative decoding "
                      "with drafts looked up by n-grams (n <= N) in the prompt and output")
    spec.add_argument("--medusa", action="store_true", help="speculative decoding with the "
                      "model's Medusa heads")
    spec.add_argument("--mtp", action="store_true", help="speculative decoding with the "
                      "model's multi-token-prediction modules")
    p.add_argument("--spec-tokens", type=int, metavar="GAMMA", help="draft tokens per "
                   "target forward (default 4; --medusa/--mtp: the model's head count, "
                   "at most 4)")


def check_spec_args(args) -> None:
    if args.spec_tokens is not None and args.spec_tokens < 1:
        raise ValueError(f"--spec-tokens must be positive, got {args.spec_tokens}")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise ValueError(f"--prompt-lookup N must be positive, got {args.prompt_lookup}")
    if args.spec_tokens is not None and not speculating(args):
        raise ValueError("--spec-tokens needs a draft source: --draft, --prompt-lookup, "
                         "--medusa or --mtp")
    if args.draft and not os.path.isdir(args.draft):
        raise ValueError(f"--draft {args.draft!r} is not a directory; pass a run or a "
                         f"Hugging Face model directory")


def add_mesh_arg(p) -> None:
    p.add_argument("--mesh", metavar="SPEC", help="shard over devices, e.g. data=2,tensor=4 "
                   "(axes data, fsdp, tensor, expert, sequence)")


def check_mesh_arg(args) -> None:
    if args.mesh:
        from jaxlm.model.sharding import parse_mesh_spec
        try:
            parse_mesh_spec(args.mesh)
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None


def add_quant_args(p) -> None:
    """--quantize, --quant-group and --cache-dtype (the server takes them too)."""
    p.add_argument("--quantize", choices=("int8", "int4"), help="serve the weights "
                   "quantized: int8 per output channel or int4 in groups (jaxlm.model.quant)")
    p.add_argument("--quant-group", type=int, default=64, metavar="G",
                   help="int4: contraction rows sharing a scale (default 64)")
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16", "float16", "int8"),
                   help="KV-cache dtype (default: the compute dtype); int8 stores keys and "
                   "values quantized with a scale per token and kv head")


def check_quant_args(args) -> None:
    if args.quant_group < 2 or args.quant_group % 2:
        raise ValueError(f"--quant-group must be an even number >= 2, got {args.quant_group}")
    if args.quant_group != 64 and args.quantize != "int4":
        raise ValueError("--quant-group applies to --quantize int4")
    if getattr(args, "save_quantized", None) and not args.quantize:
        raise ValueError("--save-quantized needs --quantize int8 or int4")


def tokenizer_file(args) -> str | None:
    """The tokenizer.json the loaded model uses (None: bytes), for --save-quantized."""
    if args.hf:
        path = os.path.join(args.hf, "tokenizer.json")
        return path if os.path.isfile(path) else None
    from jaxlm.model.io.runs import read_run_file
    spec = read_run_file(args.checkpoint)["tokenizer"]
    return None if spec == "byte" else os.path.join(args.checkpoint, spec)


def _ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def check_args(args) -> None:
    """The checks that need no model, so bad flags fail before anything loads."""
    from jaxlm.ops.sampling import Sampling
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    check_spec_args(args)
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2, got {args.max_len}")
    check_quant_args(args)
    if args.save_quantized and os.path.exists(os.path.join(args.save_quantized, "run.json")):
        raise ValueError(f"--save-quantized {args.save_quantized!r} already holds a run; "
                         f"pick a new directory")
    check_mesh_arg(args)
    try:
        Sampling(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as e:  # name the flag, not the field
        msg = str(e).replace("Sampling.", "--").replace("top_", "top-").replace("min_p",
                                                                                "min-p")
        raise ValueError(msg) from None
    check_source(args)
    if args.prompt is None and args.prompt_ids is None:
        args.prompt = ["Hello"]
    for text in args.prompt or []:
        if not text:
            raise ValueError("--prompt is empty; give at least one character")
    for text in args.prompt_ids or []:
        if not _ids(text, "--prompt-ids"):
            raise ValueError("--prompt-ids is empty; give at least one token id")
    from jaxlm.model.io.peft import read_peft_config
    for path in args.adapter or []:
        read_peft_config(path)   # a directory holding adapter_config.json, before any loading
    adapter_ids(args)


def check_source(args) -> None:
    """--checkpoint RUN or --hf DIR (a Hugging Face model, or a PEFT adapter over a local
    base) names a directory of the right kind (also the server's)."""
    path = args.checkpoint or args.hf
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; pass an existing "
                         f"{'run' if args.checkpoint else 'Hugging Face model'} directory")
    if args.checkpoint and not os.path.isfile(os.path.join(path, "run.json")):
        raise ValueError(f"{path!r} is not a jaxlm run directory (no run.json); pass a run "
                         f"written by python -m jaxlm.train, or --hf for other directories")
    if args.hf and not any(os.path.isfile(os.path.join(path, name))
                           for name in ("config.json", "adapter_config.json")):
        raise ValueError(f"{path!r} has no config.json; is it a Hugging Face model directory?")


def speculating(args) -> bool:
    return bool(args.draft or args.prompt_lookup or args.medusa or args.mtp)


def speculative(args, lm):
    """The Speculative setting the flags ask for (None: plain decoding)."""
    if not speculating(args):
        return None
    from jaxlm.infer.speculative import Speculative
    gamma = args.spec_tokens
    if args.medusa or args.mtp:
        heads = lm.cfg.medusa_heads if args.medusa else lm.cfg.mtp_depth
        return Speculative("medusa" if args.medusa else "mtp",
                           n_draft=gamma or max(1, min(4, heads)))
    if args.prompt_lookup:
        return Speculative("lookup", n_draft=gamma or 4, ngram=args.prompt_lookup)
    return Speculative("draft", n_draft=gamma or 4, draft=load_model(args.draft, args.dtype))


def load_model(path: str, dtype=None):
    """A CausalLM from any directory the one loader reads (jaxlm.model.io.load)."""
    from jaxlm.model.io.load import load as load_dir
    return load_dir(path, dtype=dtype).lm


def adapter_ids(args) -> list[int] | None:
    """Each prompt's adapter id from --adapter-ids (default all 0), checked; None when
    no --adapter is given."""
    n_prompts = len(args.prompt or []) + len(args.prompt_ids or [])
    if args.adapter_ids is None:
        return [0] * n_prompts if args.adapter else None
    if not args.adapter:
        raise ValueError("--adapter-ids needs --adapter (the adapters the ids index)")
    ids = _ids(args.adapter_ids, "--adapter-ids")
    if len(ids) != n_prompts:
        raise ValueError(f"--adapter-ids has {len(ids)} ids for {n_prompts} prompts; give "
                         f"one per prompt (--prompt ones first, then --prompt-ids)")
    n = len(args.adapter)
    bad = [i for i in ids if not -1 <= i < n]
    if bad:
        raise ValueError(f"--adapter-ids {bad} out of range: {n} --adapter given, so ids "
                         f"are 0..{n - 1}, or -1 for the base model")
    return ids


def load(args, mesh=None):
    """(lm, tokenizer or None, default stop ids) from --checkpoint or --hf through the one
    loader (jaxlm.model.io.load: runs of every kind, HF and PEFT directories), parameters
    placed straight into their shards when a mesh is given."""
    import absl.logging  # orbax warns about read-only managers on every restore
    absl.logging.set_verbosity(absl.logging.ERROR)
    from jaxlm.model.io.load import load as load_dir
    path = args.checkpoint or args.hf
    got = load_dir(path, step=args.step, dtype=args.dtype, mesh=mesh)
    if got.kind == "run":
        print(f"loaded {path} step {got.step}", file=sys.stderr)
    if got.tokenizer is None and args.prompt:
        raise ValueError(f"{path!r} has no tokenizer.json, so --prompt cannot be "
                         f"encoded; add the tokenizer or pass --prompt-ids")
    return got.lm, got.tokenizer, got.stop_ids


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids)) + " "


def stream_one(engine, tokenizer, prompt, args, sampling, stops, ids=None) -> None:
    """Print the prompt's continuation as it is produced. Text is re-decoded as a whole
    and only its new tail printed, so multi-byte characters and merges come out right."""
    out, shown = [], ""
    for chunk in engine.stream([prompt], max_new_tokens=args.max_new_tokens,
                               sampling=sampling, seed=args.seed, stop_tokens=stops,
                               chunk=args.chunk, adapter_ids=ids):
        out += chunk[0]
        text = _text(tokenizer, out)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the rest
            continue
        sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
        sys.stdout.flush()
        shown = text
    text = _text(tokenizer, out)
    sys.stdout.write(text[len(shown):] + "\n")


def bench_speculative(engine, prompts, args, sampling, stops) -> None:
    n = args.max_new_tokens
    engine.generate(prompts, max_new_tokens=n, sampling=sampling, stop_tokens=stops)  # compile
    t0 = time.perf_counter()
    outs = engine.generate(prompts, max_new_tokens=n, sampling=sampling, seed=args.seed,
                           stop_tokens=stops)
    dt = time.perf_counter() - t0
    st, total = engine.speculative_stats, sum(len(o) for o in outs)
    print(f"batch {len(prompts)}, new tokens {total}, speculative {engine.spec.spec.source} "
          f"(γ = {engine.spec.spec.n_draft})")
    print(f"generate             {total / dt:9.1f} tokens/s (prefill included)")
    print(f"acceptance rate      {st['acceptance_rate']:9.3f}")
    print(f"tokens per forward   {st['tokens_per_forward']:9.3f} "
          f"({st['rounds']} target forwards after the prompt)")


def bench(engine, prompts, args, sampling, stops, ids=None) -> None:
    import jax
    import numpy as np
    if engine.spec is not None:
        return bench_speculative(engine, prompts, args, sampling, stops)
    n, b = args.max_new_tokens, len(prompts)
    engine.generate(prompts, max_new_tokens=n, sampling=sampling, stop_tokens=stops,
                    adapter_ids=ids)  # compile
    key_p, key_d = jax.random.split(jax.random.key(args.seed))
    t0 = time.perf_counter()
    first, logits, cache = engine.prefill_prompts(prompts, n, key_p, sampling,
                                                  adapter_ids=ids)
    np.asarray(first)  # on the host: the first token is out
    t1 = time.perf_counter()
    nbytes, shape = cache.nbytes, (cache.batch, cache.max_len)
    state = engine.start(first, logits, key_d, max_new_tokens=n,
                         stop_tokens=stops)
    t2 = time.perf_counter()
    state, cache = engine.decode(state, cache, stop_tokens=stops, sampling=sampling)
    counts = np.asarray(state.counts)
    t3 = time.perf_counter()
    prompt_tokens = sum(len(p) for p in prompts)
    decoded = int(counts.sum()) - b
    print(f"batch {b}, prompt tokens {prompt_tokens}, new tokens {int(counts.sum())}")
    print(f"time to first token  {1e3 * (t1 - t0):9.2f} ms")
    print(f"prefill              {prompt_tokens / (t1 - t0):9.1f} tokens/s")
    print(f"decode               {decoded / max(t3 - t2, 1e-9):9.1f} tokens/s "
          f"({1e3 * (t3 - t2) / max(int(state.step) - 1, 1):.2f} ms/step)")
    print(f"cache memory         {nbytes / 2**20:9.2f} MiB "
          f"({shape[0]} rows x {shape[1]} slots, {engine.cfg.n_layers} layers; "
          f"{engine.cache_dtype or engine.cfg.dtype}, {engine.kv_bytes_per_token} bytes "
          f"per token)")


def run(args) -> None:
    check_args(args)
    from jaxlm.model.sharding import init_distributed, make_mesh
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    if jax.process_index() != 0:  # every process computes; the first one prints
        sys.stdout = open(os.devnull, "w")
    from jaxlm.infer.engine import Engine
    from jaxlm.ops.sampling import Sampling
    mesh = make_mesh(args.mesh) if args.mesh else None
    lm, tokenizer, stops = load(args, mesh)
    if args.stop_ids is not None:
        stops = _ids(args.stop_ids, "--stop-ids")
    prompts = [tokenizer.encode(t) for t in args.prompt or []]
    prompts += [_ids(t, "--prompt-ids") for t in args.prompt_ids or []]
    for text, ids in zip(args.prompt or [], prompts):
        if not ids:
            raise ValueError(f"--prompt {text!r} encodes to no tokens")
    sampling = None if args.temperature == 0 else Sampling(args.temperature, args.top_k,
                                                           args.top_p, args.min_p)
    ids = adapter_ids(args)
    max_len = args.max_len or lm.cfg.max_position
    if ids is not None and len(args.adapter) == 1 and set(ids) == {0}:
        from jaxlm.model.io.peft import load_peft
        lm, ids = load_peft(lm, args.adapter[0]), None  # one adapter: on the model itself
    adapters = args.adapter if ids is not None else None
    quantize, merge = args.quantize, args.merge
    if quantize:
        from jaxlm.model.quant import quantize as quantize_weights, weight_bytes
        if merge:   # fold the LoRA into the float weights first (Engine does the same)
            from jaxlm.model import peft
            lm, merge = peft.merge(lm), False
        lm, quantize = quantize_weights(lm, args.quantize, args.quant_group), None
        wb = weight_bytes(lm)
        print(f"weights {args.quantize}: {wb['quantized'] / 2**20:.2f} MiB quantized "
              f"({wb['quantized'] / wb['float_equivalent']:.3f}x of float32) + "
              f"{wb['other'] / 2**20:.2f} MiB float", file=sys.stderr)
        if args.save_quantized:
            from jaxlm.model.io.runs import save_model
            save_model(lm, args.save_quantized, tokenizer_file(args))
            print(f"saved the quantized model to {args.save_quantized} (load it with "
                  f"--checkpoint {args.save_quantized})", file=sys.stderr)
    engine = Engine(lm, max_len=max_len, mesh=mesh, adapters=adapters, merge=merge,
                    speculative=speculative(args, lm), cache_dtype=args.cache_dtype)
    if args.quantize or args.cache_dtype:
        print(f"KV cache: {engine.cache_dtype or lm.cfg.dtype}, {engine.kv_bytes_per_token} "
              f"bytes per token", file=sys.stderr)
    del lm  # the engine holds its own per-layer copy of the weights
    engine.check(prompts, args.max_new_tokens, stops, ids)
    if args.bench:
        bench(engine, prompts, args, sampling, stops, ids)
    elif len(prompts) == 1:
        if tokenizer is not None and args.prompt:
            sys.stdout.write(args.prompt[0])
        stream_one(engine, tokenizer, prompts[0], args, sampling, stops, ids)
    else:
        outs = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               seed=args.seed, stop_tokens=stops, adapter_ids=ids)
        for i, (p, out) in enumerate(zip(prompts, outs)):
            print(f"--- [{i}]\n{_text(tokenizer, p)}{_text(tokenizer, out)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
