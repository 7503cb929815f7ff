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
    # a dim the mesh axis does not divide stays replicated rather than failing
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh) == \
        P("fsdp", None, None)
    # an axis is used once per array; batch takes data and fsdp together
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)


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
