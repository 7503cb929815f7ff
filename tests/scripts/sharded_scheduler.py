"""Run under 4 emulated CPU devices (tests/test_serve_core.py starts it in a subprocess).

The paged scheduler on a mesh — stacked LoRA/bottleneck adapters per request, prompt-lookup
speculative decoding, int8 base weights (QLoRA) with an int8 KV cache, a dense model on
tensor=2 and data=2,tensor=2, an MoE model on expert=2 — against the same scheduler on one
device, and the kv-head split of its page pools. Prints one JSON report: {case: {"equal": bool, "tokens": n, ...}}.

    python tests/scripts/sharded_scheduler.py
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
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

DENSE = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
               max_position=96, init_std=0.3)
MOE = DENSE.replace(n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16)
SPECS = [P.LoraSpec(r=2, alpha=4.0, targets=("q_proj", "v_proj", "lm_head")),
         P.LoraSpec(r=4, alpha=3.0, targets=("k_proj", "o_proj")),
         P.BottleneckSpec(dim=6, activation="gelu")]
rng = np.random.default_rng(0)
# repetitive prompts, so prompt lookup finds drafts
PROMPTS = [(rng.integers(0, 6, 4).tolist() * 8)[:n] for n in (5, 9, 17, 6)]
IDS = [0, 1, 2, -1]


def run(lm, adapters, mesh, **kw):
    sched = Scheduler(lm, adapters=adapters, mesh=mesh, max_seqs=4, page_size=4,
                      max_batched_tokens=32, **kw)
    reqs = [Request(prompt=p, max_tokens=8, adapter=a if adapters else -1, id=str(i))
            for i, (p, a) in enumerate(zip(PROMPTS, IDS))]
    out = drive(sched, [(0, r) for r in reqs])
    sched.pool.check_whole()
    pools = sched.pools[0][0]
    return out, sched, str(getattr(pools.sharding, "spec", None))


report = {}
LOOKUP = Speculative("lookup", 3, ngram=2)
for name, cfg, mesh_spec, kw in [
        ("tensor_lookup", DENSE, "tensor=2", {"speculative": LOOKUP}),
        # QLoRA: int8 base weights, the adapters unmerged over them, an int8 KV cache
        ("data_tensor_qlora_int8", DENSE, "data=2,tensor=2",
         {"cache_dtype": "int8", "quantize": "int8", "speculative": LOOKUP}),
        ("expert_lookup", MOE, "expert=2", {"speculative": Speculative("lookup", 2, ngram=3)}),
        # a vocabulary that tensor=2 does not divide (as GPT-2's 50257): padded, logits cut
        ("odd_vocab_tensor", DENSE.replace(vocab_size=63), "tensor=2",
         {"speculative": LOOKUP}),
]:
    base = tiny_lm(cfg)
    if kw.pop("quantize", None):
        base = quantize(base, "int8")
    adapters = [adapted_lm(base, s, seed=i + 1) for i, s in enumerate(SPECS)]
    one, _, _ = run(base, adapters, None, **kw)
    sizes = parse_mesh_spec(mesh_spec)
    mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    sharded, sched, spec = run(base, adapters, mesh, **kw)
    report[name] = {"equal": one == sharded, "tokens": sum(map(len, one.values())),
                    "pool_spec": spec, "stats": sched.stats()}
    if name == "odd_vocab_tensor":   # the engine's path too, and the embedding's split
        # the engine on the mesh, speculating (prompt lookup) with stacked adapters
        want = [Engine(base if a == -1 else adapters[a]).generate([p], max_new_tokens=8)[0]
                for p, a in zip(PROMPTS, IDS)]
        engine = Engine(base, adapters=adapters, mesh=mesh, speculative=LOOKUP)
        report[name]["engine_equal"] = engine.generate(
            PROMPTS, max_new_tokens=8, adapter_ids=IDS) == want
        table = engine.weights.outer["embed"]["embedding"][...]
        report[name]["embed_rows"] = [table.shape[0], str(table.sharding.spec)]
print(json.dumps(report))
