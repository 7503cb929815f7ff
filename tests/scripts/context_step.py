"""Run under 8 emulated CPU devices (tests/test_context.py starts it in a subprocess).

Context parallelism against one device: for each case, one train step on a mesh with a
'sequence' axis (loss, gradient norm, updated parameters) and, for dense models, the
engine's prefill logits and greedy tokens on that mesh. Prints one JSON report.

    python tests/scripts/context_step.py
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.infer import Engine  # noqa: E402
from jaxlm.model import Config  # noqa: E402
from jaxlm.model.build import SplitModel  # noqa: E402
from jaxlm.model.sharding import make_mesh  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402
from jaxlm.model import sharding  # noqa: E402
from jaxlm.train.step import (init_state, make_optimizer, make_train_step,  # noqa: E402
                              sequence_layout)

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
            init_std=0.1, max_position=64)
MODELS = {
    # a sliding window on layer 1 (3 tokens: most block pairs are skipped), RoPE
    "dense": Config(**BASE, sliding_window=3, sliding_layers=(1,)),
    # the absorbed form: attention over the latent (dv != d); its engine runs an int8 cache,
    # whose scales the ring path dequantizes first
    "mla": Config(**BASE, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, mla_absorb=True),
    "moe": Config(**BASE, n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16),
}
T = 16
TCFG = TrainConfig(steps=10, warmup_steps=0, grad_accum=2, batch_size=4, seq_len=T,
                   lr=3e-4, eps=1e-6)
rng = np.random.default_rng(0)
tok = rng.integers(0, 64, (2, 4, T + 1))
# packed documents: segment ids along each row, positions restarting in each document
seg = np.cumsum(rng.random((2, 4, T)) < 0.15, axis=-1).astype(np.int32)
starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1, axis=-1) != 0,
                                        np.arange(T), 0), axis=-1)
BATCH = {"inputs": tok[..., :-1].astype(np.int32), "targets": tok[..., 1:].astype(np.int32),
         "positions": (np.arange(T) - starts).astype(np.int32), "segment_ids": seg,
         "loss_mask": rng.random((2, 4, T)) < 0.8}
PROMPTS = [rng.integers(0, 64, n).tolist() for n in (13, 5, 9, 16)]
CASES = [  # (model, mesh, variant, order, check the engine too)
    ("dense", "sequence=4", "ring", "zigzag", True),
    ("dense", "data=2,sequence=4", "ring", "zigzag", False),
    ("dense", "fsdp=2,sequence=2,tensor=2", "ring", "zigzag", False),
    ("dense", "sequence=4", "allgather", "contiguous", False),
    ("mla", "sequence=4", "ring", "zigzag", True),
    ("moe", "expert=2,sequence=4", "ring", "zigzag", False),
]


def devices_for(spec):
    n = int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))
    return jax.devices()[:n]


def step_once(cfg, mesh, order="zigzag"):
    """(new state, metrics, the step's StableHLO text on a mesh)."""
    model = SplitModel.create(cfg, 0, mesh)
    tcfg = TCFG.replace(sequence_order=order)
    opt = make_optimizer(tcfg, model.params)
    state = init_state(tcfg, cfg, model.params, opt, mesh)
    step = make_train_step(model, tcfg, opt, mesh)
    text = ""
    if mesh is not None:
        n = dict(mesh.shape)["sequence"]
        batch = sharding.global_batch(sequence_layout(BATCH, n, 2, order), mesh, 1,
                                      length_dim=2)
        with jax.set_mesh(mesh):
            text = step.jitted.lower(state, batch, None, None).as_text()
    new, metrics = step(state, BATCH)
    return new, jax.device_get(metrics), text


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    refs, engines = {}, {}
    report = {}
    for name, spec, variant, order, engine in CASES:
        cfg = MODELS[name].replace(context_parallel=variant)
        if name not in refs:
            refs[name] = step_once(MODELS[name], None)[:2]
        ref, ref_m = refs[name]
        mesh = make_mesh(spec, devices_for(spec))
        new, m, text = step_once(cfg, mesh, order)
        row = {"loss": abs(float(m["loss"]) - float(ref_m["loss"])),
               "grad_norm": abs(float(m["grad_norm"]) - float(ref_m["grad_norm"])),
               "params": max_diff(new.params, ref.params),
               # the ring passes K/V blocks between devices; the all-gather variant gathers
               "collective_permute": "collective_permute" in text,
               "all_gather": "all_gather" in text}
        if engine:
            lm = SplitModel.create(MODELS[name], 0).merge(ref.params)
            dtype = "int8" if name == "mla" else None
            if name not in engines:
                engines[name] = Engine(lm, cache_dtype=dtype).generate(
                    PROMPTS, max_new_tokens=4, record_logits=True)
            want, want_logits = engines[name]
            got, logits = Engine(SplitModel.create(cfg, 0).merge(ref.params), mesh=mesh,
                                 cache_dtype=dtype).generate(PROMPTS, max_new_tokens=4,
                                                             record_logits=True)
            row.update(tokens_equal=got == want,
                       logits=float(np.abs(logits - want_logits).max()))
            if name == "dense":   # prompts prefilled after a cached prefix: starts > 0
                row["prefix_cache"] = prefix_cached(lm, SplitModel.create(cfg, 0).merge(
                    ref.params), mesh)
        report[f"{name} {spec} {variant} {order}"] = row
        print(f"{name} {spec} {variant} {order}: {row}", flush=True)
    report["mtp_refused"] = mtp_refused()
    print(json.dumps(report))


SHARED = rng.integers(0, 64, 20).tolist()
PREFIXED = [SHARED + rng.integers(0, 64, n).tolist() for n in (3, 7, 1)]


def prefix_cached(lm, lm_on_mesh, mesh) -> dict:
    """Greedy tokens and logits with the prefix cache on (the second call copies the
    shared prefix in and prefills only the suffixes, after filled slots) on the mesh
    against one device, and whether the cache was used."""
    out = {}
    for key, engine in (("one", Engine(lm)), ("mesh", Engine(lm_on_mesh, mesh=mesh))):
        for _ in range(2):
            out[key] = engine.generate(PREFIXED, max_new_tokens=4, prefix_cache=True,
                                       record_logits=True)
        out[key + "_stored"] = len(engine.prefixes) > 0
    return {"tokens_equal": out["one"][0] == out["mesh"][0],
            "logits": float(np.abs(out["one"][1] - out["mesh"][1]).max()),
            "used": out["one_stored"] and out["mesh_stored"]}


def mtp_refused() -> bool:
    """MTP heads read tokens ahead, on other devices under a 'sequence' axis: refused."""
    from jaxlm.model.build import create
    lm = create(MODELS["dense"].replace(mtp_depth=1), 0)
    with jax.set_mesh(make_mesh("sequence=4", devices_for("sequence=4"))):
        try:
            lm.with_heads(np.zeros((1, 8), np.int32))
        except ValueError as e:
            return "sequence" in str(e)
    return False


if __name__ == "__main__":
    main()
