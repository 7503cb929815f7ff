"""Decode speed and memory of weight and KV-cache quantization, side by side in one run.

    python benchmarks/quantize.py                       # batch 1 and 8, prompt 128, 128 new tokens
    python benchmarks/quantize.py --batches 1 --repeats 5
    python benchmarks/quantize.py --checkpoint runs/NAME   # a trainer run instead of random init
    python benchmarks/quantize.py --quick               # tiny sizes: a smoke run

Variants (one Engine each, all on the same weights): float32; bfloat16 (parameters and
compute); int8 weights (per output channel); int4 weights (groups of 64 along the
contraction); int8 weights + int8 KV cache; float32 weights + int8 KV cache. The model is
by default the Llama-style model of benchmarks/common.py (hidden 512, 8 layers, 8 heads,
2 KV heads, FFN 1408, vocab 32000), randomly initialised in float32; the other variants
are made from it (bfloat16 by casting every parameter, int8/int4 with
jaxlm.model.quant.quantize).

Timing: per batch size, every variant prefills its prompts once and compiles its decode
loop with a first, untimed run. Then rounds alternate the variants (this kind of shared VM
swings by ±20% within minutes, so the variants of one round see the same load), each
timing only the jitted greedy decode loop over max_new_tokens - 1 steps (the first new
token comes from prefill) on a fresh copy of the prefilled cache, until the tokens are on
the host. The best round is reported: ms per step and tokens/s (batch × steps / time).

Memory: model bytes are all the model's state arrays; "linear weights" are the weights
quantization applies to (attention, MLP, LM head), in their stored form; the KV cache per
token is the engine's (int8 counts its scales). Bytes read per decode step = the model's
state minus the embedding table plus the batch's rows of it (the embedding is a gather)
+ batch × KV bytes per token × the mean context over the decode (prompt + (new - 1)/2).
Effective GB/s = those bytes / the measured step time.

The HLO check compiles, for the backend in use, the int8 Dense matmul
(jaxlm.ops.int8_matmul) on the model's MLP shapes and one decode step of the int8 engine,
and reports whether the int8→float convert of each weight is fused into the dot's fusion
or is a fusion of its own that writes a float copy of the weight (which the dot then
reads). It then compiles the int8 and int4 engines' whole decode loops (the jitted while
loop the timings run) and reports whether those conversions stay inside the loop body
(every step) or were hoisted before the loop (loop-invariant code motion: the loop then
reads float copies of the weights), with each program's temporary memory.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import MODEL, machine

QUICK_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)

# name, weights ("float32" / "bfloat16" / "int8" / "int4"), KV cache dtype (None: compute),
# keep_quantized (None: the engine's default, which on CPU lets XLA hoist the weights'
# dequantization out of the decode loop; True: dequantize in every step, as on GPU/TPU)
VARIANTS = [("float32", "float32", None, None),
            ("bfloat16", "bfloat16", None, None),
            ("int8", "int8", None, None),
            ("int4 g{group}", "int4", None, None),
            ("int8 + int8 KV", "int8", "int8", None),
            ("float32 + int8 KV", "float32", "int8", None),
            ("int8, in-loop dequant", "int8", None, True)]


# Models ------------------------------------------------------------------------------
def base_model(args):
    """The float32 CausalLM every variant is made from, and a line saying what it is."""
    from jaxlm.model import create
    from jaxlm.model.io import config_from_hf
    if args.checkpoint:
        from jaxlm.model.io.runs import load_run
        lm, _, step = load_run(args.checkpoint)
        return cast(lm, "float32"), f"checkpoint {args.checkpoint} (step {step}), as float32"
    spec = QUICK_MODEL if args.quick else MODEL
    cfg = config_from_hf({"model_type": "llama", **spec})
    return create(cfg, seed=0), "random init (seed 0), float32"


def cast(lm, dtype: str):
    """lm with its parameters stored and computed in dtype (a new model; lm unchanged)."""
    from flax import nnx
    from jaxlm.model import abstract_model
    cfg = lm.cfg.replace(dtype=dtype, param_dtype=dtype)
    if cfg == lm.cfg:
        return lm
    graph, shapes = nnx.split(abstract_model(cfg))
    state = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), nnx.state(lm), shapes)
    return nnx.merge(graph, state)


def embedding_bytes(lm) -> tuple[int, int]:
    """(bytes of the embedding table, bytes of one of its rows); (0, 0) when it is tied
    to the LM head (then the whole table is read as the head every step)."""
    if lm.cfg.tie_embeddings:
        return 0, 0
    from flax import nnx
    emb = nnx.state(lm)["embed"]["embedding"][...]
    return emb.nbytes, emb.nbytes // emb.shape[0]


# Timing ------------------------------------------------------------------------------
class Timed:
    """One variant at one batch size: its prompts prefilled once; `run()` decodes from a
    copy of that cache and returns (seconds of the decode loop, tokens [b, n])."""

    def __init__(self, engine, prompts: list[list[int]], new_tokens: int):
        self.engine, self.n = engine, new_tokens
        self.key = jax.random.key(0)
        self.first, self.logits, self.cache = engine.prefill_prompts(prompts, new_tokens,
                                                                     self.key)
        jax.block_until_ready((self.first, self.logits, self.cache))

    def run(self) -> tuple[float, np.ndarray]:
        cache = jax.tree.map(jnp.copy, self.cache)          # decode donates its cache
        state = self.engine.start(self.first, self.logits, self.key, max_new_tokens=self.n)
        jax.block_until_ready((cache, state))
        t = time.perf_counter()
        state, cache = self.engine.decode(state, cache)
        tokens = np.asarray(state.tokens)
        return time.perf_counter() - t, tokens


# HLO check ---------------------------------------------------------------------------
_INST = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (\S+|\(.*?\)) ([\w\-]+)\(([^)]*)\)(.*)$")
_INT = re.compile(r"^\(?[su](4|8)\[")


def _computations(text: str) -> dict[str, dict]:
    """{computation: {instruction: (type, op, operands, attrs)}} of compiled HLO text."""
    comps, cur = {}, None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{") and "(" in line:
            cur = line.split("(")[0].replace("ENTRY", "").strip().lstrip("%")
            comps[cur] = {}
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            m = _INST.match(line.strip())
            if m:
                name, typ, op, operands, attrs = m.groups()
                refs = [operands] if op == "parameter" else re.findall(r"%([\w.\-]+)", operands)
                comps[cur][name] = (typ, op, refs, attrs)
    return comps


def _callers(comps) -> dict[str, tuple[str, str]]:
    """{called computation: (computation, instruction) that calls it}."""
    out = {}
    for comp, insts in comps.items():
        for name, (_, _, _, attrs) in insts.items():
            for called in re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", attrs):
                out[called] = (comp, name)
    return out


def _has_int_input(comps, comp: str) -> bool:
    return any(op == "parameter" and _INT.match(typ) for typ, op, _, _ in comps[comp].values())


def _origin(comps, callers, comp: str, name: str, depth: int = 0):
    """(computation where integers become this float dot operand, its float type) when
    the operand comes from int8/int4 values, else None. Followed back through layout ops,
    the scale's multiply and fusion parameters (out to the fusion's caller)."""
    if depth > 20 or name not in comps[comp]:
        return None
    typ, op, operands, attrs = comps[comp][name]
    if op == "convert" and operands and _INT.match(comps[comp].get(operands[0], ("",))[0]):
        return comp, typ
    if op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
        if _has_int_input(comps, called) and not _INT.match(typ):
            return comp, typ                    # a fusion of its own does the convert
    if op == "parameter" and comp in callers:   # a fusion's input: follow it out
        parent, caller = callers[comp]
        idx = int(operands[0])
        parent_ops = comps[parent][caller][2]
        if comps[parent][caller][1] == "fusion" and idx < len(parent_ops):
            return _origin(comps, callers, parent, parent_ops[idx], depth + 1)
        return None
    if op in ("bitcast", "copy", "transpose", "reshape", "broadcast", "multiply"):
        for o in operands:
            found = _origin(comps, callers, comp, o, depth + 1)
            if found:
                return found
    return None


def convert_placement(text: str) -> list[tuple]:
    """(dot, 'fused' or 'separate', the float type the conversion makes) per dot of
    compiled HLO text with an operand made from int8/int4 values: 'fused' when the
    conversion happens inside the dot's own fusion, 'separate' when an op or fusion of
    its own writes the float array that the dot then reads."""
    comps = _computations(text)
    callers = _callers(comps)
    fusions = {c for insts in comps.values() for _, op, _, attrs in insts.values()
               if op == "fusion" for c in re.findall(r"calls=%([\w.\-]+)", attrs)}
    found = []
    for comp, insts in comps.items():
        for name, (_, op, operands, _) in insts.items():
            if op != "dot":
                continue
            for o in operands:
                where = _origin(comps, callers, comp, o)
                if where:
                    kind = "fused" if where[0] == comp and comp in fusions else "separate"
                    found.append((name, kind, where[1], where[0]))
    return found


def hlo_check(engine, cfg, batch: int) -> list[str]:
    """Lines saying where XLA (this backend) puts the int8→float convert of a weight."""
    from jaxlm.infer.cache import DecodeCache
    from jaxlm.infer.forward import forward
    from jaxlm.ops import int8_matmul, quantize_int8
    lines = []
    backend = jax.default_backend().upper()
    d, f = cfg.d_model, cfg.ffn_dim
    x = jnp.ones((batch, d), jnp.float32)
    q, s = quantize_int8(jnp.ones((d, f), jnp.float32), 1)
    text = jax.jit(lambda x, q, s: int8_matmul(x, q, s, 1)).lower(x, q, s).compile().as_text()
    places = convert_placement(text)
    if not places:
        lines.append(f"XLA {backend}, int8_matmul [{batch},{d}]·int8[{d},{f}]: no dot with an "
                     f"integer operand found in the compiled HLO")
    elif all(k == "fused" for _, k, _, _ in places):
        lines.append(f"XLA {backend}, int8_matmul [{batch},{d}]·int8[{d},{f}]: the int8→f32 "
                     f"convert is fused into the dot's fusion (the weight is read as int8)")
    else:
        typ = next(t for _, k, t, _ in places if k == "separate")
        lines.append(f"XLA {backend}, int8_matmul [{batch},{d}]·int8[{d},{f}]: the int8→f32 "
                     f"convert is a separate fusion (not fused into the dot), writing "
                     f"{typ.split('{')[0]}: the weight is expanded to f32 on every call")
    # one decode step of the int8 engine (all layers and the head)
    cache = DecodeCache.create(cfg, batch, 64, engine.cache_dtype)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    text = jax.jit(forward, static_argnums=0).lower(engine.graphs, engine.weights, tokens,
                                                   cache).compile().as_text()
    places = convert_placement(text)
    fused = sum(k == "fused" for _, k, _, _ in places)
    separate = [t for _, k, t, _ in places if k == "separate"]
    expanded = sum(map(_type_bytes, separate))
    lines.append(f"XLA {backend}, one int8 decode step (batch {batch}): {len(places)} dots on "
                 f"int8 weights, {fused} with the convert fused into the dot, {len(separate)} "
                 f"with a separate convert fusion writing a float copy of the weight "
                 f"({expanded / 1e6:.1f} MB written and read back per step)")
    return lines


def _conversions(comps) -> dict[str, list[str]]:
    """Integer→float conversions outside fused computations, by computation: a fusion
    with an int8/int4 input and a float output, or a plain convert from one."""
    fused = {c for insts in comps.values() for _, op, _, attrs in insts.values()
             if op == "fusion" for c in re.findall(r"calls=%([\w.\-]+)", attrs)}
    out = {}
    for comp, insts in comps.items():
        if comp in fused:
            continue
        for name, (typ, op, operands, attrs) in insts.items():
            if _INT.match(typ) or not re.match(r"^b?f\d", typ):
                continue
            if op == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
                hit = _has_int_input(comps, called)
            else:
                hit = op == "convert" and bool(operands) and bool(
                    _INT.match(insts.get(operands[0], ("",))[0]))
            if hit:
                out.setdefault(comp, []).append(typ)
    return out


def _reachable(comps, roots) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for _, _, _, attrs in comps[c].values():
            stack += re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", attrs)
    return seen


def _type_bytes(typ: str) -> int:
    dims = typ.split("[")[1].split("]")[0]
    return math.prod(int(d) for d in dims.split(",") if d) * (2 if typ.startswith(("bf16", "f16"))
                                                              else 4)


def loop_check(variants, batch: int, n: int) -> list[str]:
    """Compile each weight variant's whole decode loop (the engine's jitted while loop)
    as the engine runs it: are the integer weights converted inside the loop (every
    step) or hoisted before it (a float copy of the weights, read by every step)? And
    the compiled program's temporary memory, which holds any such copy."""
    from jaxlm.infer import engine as engine_mod
    lines, temps = [], {}
    for v in variants:
        if v["name"] not in ("float32", "int8", "int8, in-loop dequant") and \
                not v["name"].startswith("int4"):
            continue
        eng, tm = v["engine"], v["timed"]
        state = eng.start(tm.first, tm.logits, tm.key, max_new_tokens=n)
        stops = engine_mod._check_stop_tokens((), eng.cfg.vocab_size)
        compiled = engine_mod._decode.lower(eng.graphs, eng.weights, state, tm.cache,
                                            np.int32(n), stops, None).compile()
        mem = compiled.memory_analysis()
        temps[v["name"]] = None if mem is None else mem.temp_size_in_bytes
        if v["name"] == "float32":
            continue
        comps = _computations(compiled.as_text())
        bodies = [re.search(r"body=%([\w.\-]+)", attrs).group(1)
                  for insts in comps.values() for _, op, _, attrs in insts.values()
                  if op == "while"]
        inside = _reachable(comps, bodies)
        conv = _conversions(comps)
        n_in = sum(len(t) for c, t in conv.items() if c in inside)
        hoisted = [t for c, t in conv.items() if c not in inside for t in t]
        where = (f"{len(hoisted)} weights converted once BEFORE the loop (loop-invariant code "
                 f"motion: every step then reads a {sum(map(_type_bytes, hoisted)) / 1e6:.1f} MB "
                 f"float copy of the weights, not the {v['name']} ones)"
                 if hoisted else "no conversion hoisted out of the loop")
        lines.append(f"XLA {jax.default_backend().upper()}, {v['name']} decode loop (batch "
                     f"{batch}): {n_in} int→float weight conversions inside the loop body, "
                     f"{where}")
    if all(x is not None for x in temps.values()):
        lines.append("compiled decode loop temporary memory: " + ", ".join(
            f"{k} {x / 1e6:.1f} MB" for k, x in temps.items()))
    return lines


# Report ------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    p.add_argument("--group", type=int, default=64, help="int4 group size")
    p.add_argument("--checkpoint", metavar="RUN", help="a trainer run directory to load")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke run)")
    p.add_argument("--skip-hlo", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 16, 8, 1
        args.batches = "1,2"
    batches = [int(b) for b in args.batches.split(",")]
    t, n = args.prompt_len, args.new_tokens
    if n < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from prefill)")

    from jaxlm.infer import Engine
    from jaxlm.model.quant import quantize, weight_bytes
    t_start = time.perf_counter()
    print(f"# quantization benchmark  {datetime.datetime.now():%Y-%m-%d %H:%M}  {machine()}")
    print(f"load average {os.getloadavg()[0]:.1f}; backend {jax.default_backend()}")
    lm32, what = base_model(args)
    cfg = lm32.cfg
    print(f"model: {what}; d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.num_kv_heads} kv heads, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    print(f"prompt {t} tokens, {n} new tokens (greedy; {n - 1} timed decode steps), batches "
          f"{batches}, best of {args.repeats} rounds")

    models = {"float32": lm32, "bfloat16": cast(lm32, "bfloat16")}
    skipped = {}
    for mode in ("int8", "int4"):
        try:
            models[mode] = quantize(lm32, mode, args.group)
        except ValueError as e:
            skipped[mode] = str(e)
    linear_f32 = (weight_bytes(models["int8"])["float_equivalent"] if "int8" in models
                  else None)
    variants = []
    for name, weights, kv, keep in VARIANTS:
        if weights not in models:
            print(f"skipped {name.format(group=args.group)}: {skipped[weights]}")
            continue
        lm = models[weights]
        engine = Engine(lm, cache_dtype=kv, keep_quantized=keep)
        wb = weight_bytes(lm)
        itemsize = {"float32": 4, "bfloat16": 2}.get(weights)
        linear = wb["quantized"] if itemsize is None else (
            None if linear_f32 is None else linear_f32 * itemsize // 4)
        emb, emb_row = embedding_bytes(lm)
        variants.append(dict(name=name.format(group=args.group), engine=engine,
                             model_bytes=wb["total"], linear=linear,
                             linear_f32=wb["float_equivalent"] or linear_f32,
                             step_weights=wb["total"] - emb, emb_row=emb_row,
                             kv_token=engine.kv_bytes_per_token, times={}, tokens={}))
    base = variants[0]
    filled = t + (n - 1) / 2                    # mean context attended per decode step

    rng = np.random.default_rng(0)
    for b in batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, t)).tolist()
        timed = []
        for v in variants:
            tm = Timed(v["engine"], prompts, n)
            tm.run()                            # compiles the decode loop (and start)
            timed.append(tm)
            v["timed"] = tm                     # the last batch's, for the HLO check
        for _ in range(args.repeats):
            for v, tm in zip(variants, timed):
                dt, tokens = tm.run()
                v["times"].setdefault(b, []).append(dt)
                v["tokens"][b] = tokens
        for v in variants:
            best = min(v["times"][b])
            v.setdefault("step", {})[b] = best / (n - 1)
            v.setdefault("read", {})[b] = (v["step_weights"] + b * v["emb_row"]
                                           + b * v["kv_token"] * filled)
        print(f"batch {b}: " + ", ".join(
            f"{v['name']} {1e3 * v['step'][b]:.2f} ms/step" for v in variants), flush=True)

    # Memory table
    ctx = t + n
    bmax = max(batches)
    print()
    print(f"## Memory (KV cache for batch {bmax} × {ctx} tokens of context)")
    print()
    print("| variant | model MB | ×f32 | linear weights MB | ×f32 | KV B/token | ×f32 "
          f"| KV MB (b={bmax}, {ctx} tok) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        lin = "n/a" if v["linear"] is None else mb(v["linear"])
        lin_r = ("n/a" if v["linear"] is None or not base["linear"]
                 else f"{v['linear'] / base['linear']:.3f}")
        print(f"| {v['name']} | {mb(v['model_bytes'])} | "
              f"{v['model_bytes'] / base['model_bytes']:.3f} | {lin} | {lin_r} | "
              f"{v['kv_token']} | {v['kv_token'] / base['kv_token']:.3f} | "
              f"{mb(v['kv_token'] * ctx * bmax)} |")

    # Speed table
    print()
    print(f"## Decode (prompt {t}, {n} new tokens, greedy; best of {args.repeats})")
    print()
    print("| variant | batch | ms/step | tok/s | tok/s ×f32 | MB read/step | effective GB/s "
          "| tokens = f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        for v in variants:
            step = v["step"][b]
            same = np.mean(v["tokens"][b] == base["tokens"][b])
            print(f"| {v['name']} | {b} | {1e3 * step:.2f} | {b / step:.1f} | "
                  f"{base['step'][b] / step:.2f} | {mb(v['read'][b])} | "
                  f"{v['read'][b] / step / 1e9:.1f} | {100 * same:.0f}% |")
    print()
    print("MB read/step counts the weights in their stored form (## HLO says what XLA "
          "actually reads)")
    print("tokens = f32: share of greedy tokens equal to float32's"
          + ("" if args.checkpoint else " (a random-init model's logits are nearly flat, so "
             "small rounding flips argmaxes; a trained --checkpoint says more)"))

    # Goals
    print()
    print("## Goals")
    by = {v["name"]: v for v in variants}
    int4 = f"int4 g{args.group}"
    if "int8" in by:
        r = by["int8"]["linear"] / by["int8"]["linear_f32"]
        print(f"- int8 weights 0.25× of float32 bytes: {r:.4f}× (values 0.25 + per-channel "
              f"scales) — {'met (0.25 at two decimals)' if round(r, 2) <= 0.25 else 'NOT met'}")
    if int4 in by:
        r = by[int4]["linear"] / by[int4]["linear_f32"]
        scales = r - 0.125
        print(f"- int4 g{args.group} weights ≤ 0.14× of float32 bytes: {r:.4f}× (values "
              f"0.125 + scales {scales:.4f}) — {'met' if r <= 0.14 else 'NOT met (strictly)'}"
              + ("" if r <= 0.14 else f"; {r:.2f}× at two decimals"))
    if "float32 + int8 KV" in by:
        r = by["float32 + int8 KV"]["kv_token"] / base["kv_token"]
        print(f"- int8 KV cache ≤ 0.27× of float32 bytes: {r:.4f}× "
              f"({by['float32 + int8 KV']['kv_token']} vs {base['kv_token']} B/token) — "
              f"{'met' if r <= 0.27 else 'NOT met'}")
    if "int8" in by:
        ratios = {b: base["step"][b] / by["int8"]["step"][b] for b in batches}
        ok = all(r >= 1 for r in ratios.values())
        print(f"- int8 decode no slower than float32 on {jax.default_backend().upper()}: "
              + ", ".join(f"batch {b} {r:.2f}× float32's tok/s" for b, r in ratios.items())
              + f" — {'met' if ok else 'NOT met'}"
              + ("" if args.skip_hlo else " (## HLO: what the decode loop reads)"))

    if not args.skip_hlo and "int8" in by:
        print()
        print("## HLO")
        for line in hlo_check(by["int8"]["engine"], cfg, bmax):
            print(line)
        try:
            for line in loop_check(variants, bmax, n):
                print(line)
        except Exception as e:                  # it reaches into the engine's private jit
            print(f"decode-loop check skipped: {type(e).__name__}: {e}")
    print()
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
