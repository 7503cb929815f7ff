"""Run under 8 emulated CPU devices (tests/test_sharding.py starts it in a subprocess)."""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm.model import CausalLM, Config  # noqa: E402
from jaxlm.model.build import create  # noqa: E402
from jaxlm.model.sharding import logical_to_spec, make_mesh  # noqa: E402

cfg = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             init_std=0.2)
tokens = jax.random.randint(jax.random.key(0), (8, 6), 0, 64)
want = np.asarray(CausalLM(cfg, nnx.Rngs(0))(tokens).logits)
forward = nnx.jit(lambda m, t: m(t).logits)
report = {}
for spec in ["data=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"]:
    mesh = make_mesh(spec)
    lm = create(cfg, 0, mesh)
    wrong = []
    for path, var in jax.tree_util.tree_leaves_with_path(
            nnx.state(lm, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        expected = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, mesh)
        if var[...].sharding.spec != expected:
            wrong.append(f"{jax.tree_util.keystr(path)}: {var[...].sharding.spec} != {expected}")
    q_spec = nnx.state(lm, nnx.Param)["blocks"][0]["attn"]["q_proj"]["kernel"][...].sharding.spec
    got = np.asarray(forward(lm, tokens))
    report[spec] = {"max_abs_diff": float(np.abs(got - want).max()), "wrong": wrong,
                    "q_spec": [str(a) for a in q_spec]}
print(json.dumps(report))
