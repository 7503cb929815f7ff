"""Sharding through JAX's runtime: a mesh from a spec, rules from logical names."""
import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.model.sharding import logical_to_spec, parse_mesh_spec


class FakeMesh:  # logical_to_spec reads only .shape
    def __init__(self, **shape):
        self.shape = shape


def test_rules_map_logical_names_to_mesh_axes():
    mesh = FakeMesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh) == \
        P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # kv heads fewer than tensor ranks (GQA) and a batch of one row replicate: expected
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh) == \
        P("fsdp", None, None)
    assert logical_to_spec(("batch", "length"), (1, 5), mesh) == P(None, None)
    # an axis is used once per array; batch takes data and fsdp together
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)


def test_an_axis_that_does_not_divide_a_dimension_is_an_error():
    """Silently replicating would hide a misconfigured mesh (memory and compute on
    every device): the error names the array, the dimension and the axis."""
    mesh = FakeMesh(data=2, fsdp=2, tensor=4)
    with pytest.raises(ValueError, match=r"parameter \['mlp'\]: dimension 1 \('mlp', size 6\)"
                                         r" does not split over mesh axis 'tensor' \(size 4\)"):
        logical_to_spec(("embed", "mlp"), (32, 6), mesh, what="parameter ['mlp']")
    with pytest.raises(ValueError, match="'embed', size 3.*'fsdp'"):
        logical_to_spec(("embed",), (3,), mesh)
    # the opt-in is explicit: with nothing replicable, kv heads must divide too
    with pytest.raises(ValueError, match="kv_heads"):
        logical_to_spec(("kv_heads",), (2,), mesh, replicable=())
    assert logical_to_spec(("mlp",), (6,), FakeMesh(tensor=1)) == P(None)  # size-1 axis


def test_mesh_spec_errors_are_one_clear_line():
    assert parse_mesh_spec("data=2,tensor=4") == {"data": 2, "tensor": 4}
    for bad, msg in [("data=2,data=2", "twice"), ("pipe=2", "unknown"), ("data=x", "axis=size"),
                     ("", "empty"), ("data=0", "size 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad)


def test_sharded_forward_equals_single_device_on_8_emulated_devices():
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_forward.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"data=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"}
    for spec, r in report.items():
        assert r["max_abs_diff"] <= 1e-5, (spec, r)
        assert not r["wrong"], (spec, r["wrong"])
    assert report["data=2,fsdp=2,tensor=2"]["q_spec"] == ["None", "fsdp", "tensor", "None"]


def _run_script(*args, timeout=300):
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_step_decode.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_equal_to_one_device(report, expert_parallel: bool):
    for spec, r in report.items():
        for key in ("loss", "grad_norm", "params", "rest", "logits", "quant_logits"):
            assert r[key] <= 1e-5, (spec, key, r[key])
        assert r["quant_tokens_equal"], spec  # int8/int4 weights and an int8 cache
        assert r["bias_moved"] == expert_parallel, spec  # the MoE config's router biases
        assert r["tokens_equal"], spec
        assert not r["misplaced"], (spec, r["misplaced"])
        assert r["cache_spec"] == r["cache_expected"], spec
        assert r["all_to_all"] == expert_parallel, spec


@pytest.mark.parametrize("kind, meshes", [
    ("dense", ["data=2,fsdp=2,tensor=2"]),
    pytest.param("dense", ["data=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"],
                 marks=pytest.mark.slow),
    ("moe", ["data=2,expert=4"]),
    pytest.param("moe", ["data=2,expert=4", "data=2,fsdp=2,expert=2"], marks=pytest.mark.slow),
])
def test_sharded_train_step_and_greedy_decode_equal_one_device(kind, meshes):
    """8 emulated devices: one train step (loss, gradient norm, every updated parameter)
    and a greedy decode (tokens, every step's logits) equal one device to 1e-5; every
    parameter, Adam moment and router bias sits where the rules put its logical axes (the
    MoE config's sigmoid-router biases, moved by the step, equal one device's too), the KV
    cache is split over rows and kv heads, and MoE layers exchange tokens by all-to-all."""
    report = _run_script(kind, *meshes)
    assert list(report) == meshes
    _assert_equal_to_one_device(report, expert_parallel=kind == "moe")
    if "data=2,fsdp=2,tensor=2" in report:
        r = report["data=2,fsdp=2,tensor=2"]
        assert r["q_spec"] == ["None", "fsdp", "tensor", "None"]  # [layers, d, h, hd]
        assert r["cache_spec"] == ["('data', 'fsdp')", "tensor", "None", "None"]


def test_infer_cli_on_a_mesh_prints_what_one_device_prints(tmp_path):
    """`python -m jaxlm.infer --mesh` on 4 emulated devices: the parameters restored
    straight into their shards, the same greedy text as without a mesh (heads split over
    tensor, the prompts' prefill over the sequence axis)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxlm.model import CausalLM, Config
    from jaxlm.model.io.runs import PARAMS_ITEM, checkpoint_manager, params_of, write_run_file
    cfg = Config(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                 init_std=0.3, max_position=64)
    run = str(tmp_path / "run")
    write_run_file(run, cfg, "byte")
    mngr = checkpoint_manager(run)
    mngr.save(1, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(
        params_of(CausalLM(cfg, nnx.Rngs(3))))}))
    mngr.wait_until_finished()
    mngr.close()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    outs = {}
    for mesh in ([], ["--mesh", "tensor=2,sequence=2"]):
        p = subprocess.run([sys.executable, "-m", "jaxlm.infer", "--checkpoint", run,
                            "--prompt-ids", "1,2,3", "--prompt-ids", "4,5",
                            "--max-new-tokens", "6", *mesh],
                           capture_output=True, text=True, env=env, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[bool(mesh)] = p.stdout
    assert outs[True] == outs[False] and outs[True].count("--- [") == 2
    bad = subprocess.run([sys.executable, "-m", "jaxlm.infer", "--checkpoint", run,
                          "--mesh", "tensor=3"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "needs 3 devices but 4 are available" in bad.stderr
