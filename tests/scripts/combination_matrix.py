"""Walk the serving feature matrix (tests/test_serve_core.py starts it in a subprocess, on 4
emulated CPU devices).

Features: weights {float, int8, int4} × KV cache {float32, int8} × prefix sharing {on, off}
× adapters {none, LoRA, bottleneck, prefix tuning, all three at once (per request)} ×
speculation {none, prompt lookup, draft model, Medusa, MTP} × mesh {one device, tensor=2,
expert=2 (an MoE model)}. Each configuration runs the paged scheduler (the server's core)
over ragged requests that share a page of prefix; every request's greedy tokens must
equal plain greedy of its own model (jaxlm.infer.Engine, no speculation, one device, the
same weights and KV dtype), or the configuration must be refused with one line.

--strength 1 covers every value of every feature once (5 configurations); --strength 2
every pair of values of any two features (all-pairs, as combinatorial testing does: ~27
configurations instead of 1,800). Prints one JSON list: [{config, status, detail}], status
"equal", "refused" (detail: the line) or "different" / "crashed" (detail: what).

    python tests/scripts/combination_matrix.py --strength 2
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import adapted_lm, drive, tiny_lm  # noqa: E402

from jaxlm.infer import Engine, Speculative  # noqa: E402
from jaxlm.infer.scheduler import Request, Scheduler  # noqa: E402
from jaxlm.model import Config  # noqa: E402
from jaxlm.model import peft as P  # noqa: E402
from jaxlm.model.quant import quantize  # noqa: E402
from jaxlm.model.sharding import make_mesh, parse_mesh_spec  # noqa: E402

FEATURES = {
    "weights": ["float", "int8", "int4"],
    "kv": ["float32", "int8"],
    "sharing": [True, False],
    "adapters": ["none", "lora", "bottleneck", "prefix", "all"],
    "spec": ["none", "lookup", "draft", "medusa", "mtp"],
    "mesh": ["none", "tensor=2", "expert=2"],
}
# one MTP module and two Medusa heads (drawn at random: drafts are poor, never wrong)
DENSE = Config(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
               max_position=16, init_std=0.3, quant_group=16, mtp_depth=1, medusa_heads=2)
MOE = DENSE.replace(n_experts=4, n_experts_per_tok=2, moe_ffn_dim=32)
ADAPTERS = {"lora": P.LoraSpec(r=2, alpha=4.0, targets=("q_proj", "v_proj", "lm_head")),
            "bottleneck": P.BottleneckSpec(dim=4, activation="gelu"),
            "prefix": P.PrefixSpec(tokens=3)}
rng = np.random.default_rng(0)
# ragged and repetitive (prompt lookup finds drafts); the first two share a page of 8
SHARED = rng.integers(0, 6, 8).tolist()
PROMPTS = [SHARED + [1], SHARED + [3], (rng.integers(0, 6, 3).tolist() * 3)[:9],
           rng.integers(0, 64, 5).tolist()]
N = 4     # with a prefix adapter's 3 virtual tokens, 16 slots: two pages a sequence


def covering(strength: int) -> list[dict]:
    """Configurations in which every value (strength 1) or every pair of values of two
    features (strength 2) appears: greedy all-pairs, deterministic."""
    names = list(FEATURES)
    if strength == 1:
        width = max(len(v) for v in FEATURES.values())
        return [{n: FEATURES[n][i % len(FEATURES[n])] for n in names} for i in range(width)]
    todo = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
            for x in FEATURES[a] for y in FEATURES[b]}
    out = []
    while todo:
        best, gain = None, -1
        for combo in itertools.product(*FEATURES.values()):
            cfg = dict(zip(names, combo))
            g = sum(((a, cfg[a]), (b, cfg[b])) in todo for a, b in itertools.combinations(names, 2))
            if g > gain:
                best, gain = cfg, g
        out.append(best)
        todo -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return out


@functools.lru_cache(maxsize=None)
def models(weights: str, moe: bool):
    """(base, {kind: adapted base}), weights as named."""
    base = tiny_lm(MOE if moe else DENSE, seed=1)
    if weights != "float":
        base = quantize(base, weights, 16)
    return base, {k: adapted_lm(base, s, seed=i + 1) for i, (k, s) in enumerate(ADAPTERS.items())}


@functools.lru_cache(maxsize=None)
def reference(weights: str, moe: bool, kv: str, kind: str) -> tuple:
    """Plain greedy of each prompt under one model (the base, or one adapted model)."""
    base, adapted = models(weights, moe)
    lm = base if kind == "none" else adapted[kind]
    return tuple(map(tuple, Engine(lm, cache_dtype=kv).generate(PROMPTS, max_new_tokens=N)))


def run(c: dict) -> dict:
    moe = c["mesh"] == "expert=2"
    base, adapted = models(c["weights"], moe)
    kinds = {"none": [], "all": list(ADAPTERS)}.get(c["adapters"], [c["adapters"]])
    # each request names its adapter; the last one is the base's
    ids = [0, 1, 2, -1] if c["adapters"] == "all" else [0 if kinds else -1] * 3 + [-1]
    spec = {"none": None, "lookup": Speculative("lookup", 3, ngram=2),
            "draft": Speculative("draft", 3, draft=tiny_lm(DENSE.replace(d_model=16, mtp_depth=0, medusa_heads=0), seed=9)),
            "medusa": Speculative("medusa", 2), "mtp": Speculative("mtp", 1)}[c["spec"]]
    mesh = None
    if c["mesh"] != "none":
        sizes = parse_mesh_spec(c["mesh"])
        mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    try:
        sched = Scheduler(base, adapters=[adapted[k] for k in kinds] or None, mesh=mesh,
                          cache_dtype=c["kv"], prefix_sharing=c["sharing"], speculative=spec,
                          max_seqs=2, page_size=8, max_batched_tokens=16, decode_steps=1)
        reqs = [Request(prompt=p, max_tokens=N, adapter=a, id=str(i))
                for i, (p, a) in enumerate(zip(PROMPTS, ids))]
        # the second arrives once the first holds its full shared page
        out = drive(sched, [(0, reqs[0]), (2, reqs[1]), (2, reqs[2]), (3, reqs[3])])
        sched.pool.check_whole()
    except ValueError as e:
        return {"status": "refused", "detail": str(e)}
    want = [reference(c["weights"], moe, c["kv"], "none" if a == -1 else kinds[a])[i]
            for i, a in enumerate(ids)]
    got = [tuple(out[str(i)]) for i in range(len(PROMPTS))]
    if got != want:
        return {"status": "different", "detail": f"got {got}, want {want}"}
    st = sched.stats()
    return {"status": "equal", "detail": {k: st.get(k, 0) for k in (
        "prefix_hit_tokens", "spec_drafted", "spec_accepted")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strength", type=int, choices=(1, 2), default=1)
    args = p.parse_args()
    report = []
    for c in covering(args.strength):
        try:
            r = run(c)
        except Exception as e:  # noqa: BLE001  (reported, the walk goes on)
            r = {"status": "crashed", "detail": f"{type(e).__name__}: {e}"[:500]}
        report.append({"config": c, **r})
        print(json.dumps(report[-1]), file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
