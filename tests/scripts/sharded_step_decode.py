"""Run under 8 emulated CPU devices (tests/test_sharding.py starts it in a subprocess).

For each mesh: one train step (loss, gradients, updated parameters) and a greedy decode
(tokens and per-step logits) against the same model on one device, plus where every
parameter, optimizer moment and cache buffer landed. Prints one JSON report.

    python tests/scripts/sharded_step_decode.py dense|moe [MESH ...]
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.infer import Engine  # noqa: E402
from jaxlm.infer.cache import cache_sharding  # noqa: E402
from jaxlm.model import Config  # noqa: E402
from jaxlm.model.sharding import logical_to_spec, make_mesh  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402
from jaxlm.model.build import SplitModel, abstract_model  # noqa: E402
from jaxlm.model.quant import quantize  # noqa: E402
from jaxlm.train.step import init_state, make_optimizer, make_train_step  # noqa: E402

KIND = sys.argv[1]
BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
            init_std=0.1, max_position=64)
CFG = Config(**BASE) if KIND == "dense" else Config(
    **BASE, n_experts=8, n_experts_per_tok=2, moe_ffn_dim=16, first_k_dense=1,
    router="sigmoid")  # selection biases in the state, moved by the step, split by 'expert'
MESHES = sys.argv[2:] or (["data=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"]
                          if KIND == "dense" else ["data=2,expert=4", "data=2,fsdp=2,expert=2"])
# Adam's first step is lr·g/(|g| + eps): for a gradient near zero (unused embedding rows)
# the 1e-8 of summation-order noise that sharding brings moves the update by a visible
# fraction of lr. eps=1e-6 and lr=3e-4 keep the parameter comparison about sharding.
TCFG = TrainConfig(steps=10, warmup_steps=0, grad_accum=2, batch_size=8, seq_len=12,
                   lr=3e-4, eps=1e-6, router_bias_rate=0.01)
rng = np.random.default_rng(0)
tok = rng.integers(0, 64, (2, 8, 13))
BATCH = {"inputs": tok[..., :-1].astype(np.int32), "targets": tok[..., 1:].astype(np.int32),
         "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (2, 8, 12)).copy(),
         "segment_ids": np.repeat(np.arange(2, dtype=np.int32), 6)[None, None]
         .repeat(2, 0).repeat(8, 1),
         # SFT-like uneven targets per row, so each data shard holds a different count:
         # the loss must be normalised by the global count, not per shard
         "loss_mask": rng.random((2, 8, 12)) < np.linspace(0.1, 1, 8)[None, :, None]}
PROMPTS = [rng.integers(0, 64, n).tolist() for n in (5, 2, 3, 7, 2, 1, 3, 4)]


def train_side(mesh):
    from jaxlm.model import sharding
    model = SplitModel.create(CFG, 0, mesh)
    opt = make_optimizer(TCFG, model.params)
    state = init_state(TCFG, CFG, model.params, opt, mesh)
    step = make_train_step(model, TCFG, opt, mesh)
    lowered = ""
    if mesh is not None:
        with jax.set_mesh(mesh):
            lowered = step.jitted.lower(state, sharding.global_batch(BATCH, mesh, 1), None,
                                       None).as_text()
    new, metrics = step(state, BATCH)
    return model, new, jax.device_get(metrics), lowered


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def misplaced(model, state, mesh):
    """Arrays whose sharding differs from what the rules give for their logical names."""
    from flax import nnx
    wrong = []
    abstract = nnx.state(abstract_model(CFG))  # Params and router biases
    names = {jax.tree_util.keystr(p): v.get_metadata()["out_sharding"] for p, v in
             jax.tree_util.tree_leaves_with_path(
                 abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adam's first moment
    for tree, what in ((state.params, "param"), (mu, "adam mu"), (state.rest, "bias")):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            key = jax.tree_util.keystr(path)
            want = logical_to_spec(names[key], x.shape, mesh)
            if x.sharding.spec != want:
                wrong.append(f"{what} {key}: {x.sharding.spec} != {want}")
    return wrong


def main():
    _, ref, ref_m, _ = train_side(None)
    lm = SplitModel.create(CFG, 0).merge(ref.params)
    want, want_logits = Engine(lm).generate(PROMPTS, max_new_tokens=8, record_logits=True)
    # Quantized weights (the dense model int4 in groups of 16, the MoE model int8) with an
    # int8 cache
    quantized = {mode: quantize(lm, mode, 16) for mode in (("int4",) if KIND == "dense"
                                                           else ("int8",))}
    q_want = {mode: Engine(q, cache_dtype="int8").generate(PROMPTS, max_new_tokens=8,
                                                           record_logits=True)
              for mode, q in quantized.items()}
    report = {}
    for spec in MESHES:
        mesh = make_mesh(spec)
        model, new, m, lowered = train_side(mesh)
        engine = Engine(lm, mesh=mesh)
        got, logits = engine.generate(PROMPTS, max_new_tokens=8, record_logits=True)
        q_equal, q_logits = True, 0.0
        for mode, q in quantized.items():
            q_got, q_lg = Engine(q, mesh=mesh, cache_dtype="int8").generate(
                PROMPTS, max_new_tokens=8, record_logits=True)
            q_equal &= q_got == q_want[mode][0]
            q_logits = max(q_logits, float(np.abs(q_lg - q_want[mode][1]).max()))
        cache = engine.new_cache(8, 16)
        k_buf = cache.layers[0][0]
        report[spec] = {
            "loss": abs(float(m["loss"]) - float(ref_m["loss"])),
            "grad_norm": abs(float(m["grad_norm"]) - float(ref_m["grad_norm"])),
            "params": max_diff(new.params, ref.params),
            "rest": max_diff(new.rest, ref.rest) if jax.tree.leaves(ref.rest) else 0.0,
            "bias_moved": bool(any(np.any(np.asarray(b)) for b in jax.tree.leaves(new.rest))),
            "tokens_equal": got == want,
            "logits": float(np.abs(logits - want_logits).max()),
            "quant_tokens_equal": q_equal,
            "quant_logits": q_logits,
            "misplaced": misplaced(model, new, mesh),
            "cache_spec": [str(a) for a in k_buf.sharding.spec],
            "cache_expected": [str(a) for a in
                               cache_sharding(mesh, k_buf, cache.slot_axis).spec],
            "all_to_all": "all_to_all" in lowered,
            "q_spec": [str(a) for a in new.params["blocks"][0]["attn"]["q_proj"]["kernel"]
                       .sharding.spec],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
