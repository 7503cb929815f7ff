"""The GPU (Triton) and TPU (Mosaic) attention kernels still lower, checked on a CPU machine.

CI has no accelerator, and interpret mode (test_pallas.py) runs kernel bodies as plain
jax, which accepts what the Triton and Mosaic lowerings refuse (tile shapes, primitives
they lack, block specs). Here each program is exported for "cuda" / "tpu" with
`jax.export`, which runs Pallas' own lowering of every kernel into the module, and the
module is read back for the kernel calls we expect: one per kernel, with its grid and
launch parameters. An abstract target device stands in for the missing accelerator
(jax ≥ 0.11 refuses to lower Triton kernels without knowing the GPU; Mosaic asks for the
TPU generation when a kernel needs it).

Not covered: the Triton → PTX compile and the Mosaic compile happen on the device itself
(shared memory or VMEM overflow, register pressure); test_pallas.py's GPU tests run there.
"""
import collections
import contextlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as plgpu

from jaxlm.ops.pallas import dispatch, tiles

# jax ≥ 0.11 exports the target name it uses; jax 0.10 uses this one.
TRITON_CALL = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
TPU_CALL = "tpu_custom_call"
_SERIALIZED_IR = re.compile(r'\bir = "(?:[^"\\]|\\.)*"')  # kernel bytecode, not attributes


@contextlib.contextmanager
def _target(device_kind, platform):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                         platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                  abstract_device=device)):
        yield


def _export(fn, platform, *args):
    """Lower fn for `platform` on this CPU machine; the module's text."""
    if platform == "cuda":
        target = _target("NVIDIA H100 80GB HBM3", "gpu")
        # Triton calls carry no serialization-compatibility promise: allow them by name.
        checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    else:
        target, checks = _target("TPU v6e", "tpu"), []  # tpu_custom_call is allowed
    with target:
        exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=checks)(*args)
    return exported.mlir_module()


def _kernel_calls(module, call_target):
    """[(kernel name, {integer attribute: value})] of every `call_target` custom call."""
    calls = []
    for line in module.splitlines():
        if f"custom_call @{call_target}(" not in line:
            continue
        line = _SERIALIZED_IR.sub("", line)
        name = re.search(r'\b(?:kernel_)?name = "([^"]*)"', line).group(1)
        ints = {k: int(v) for k, v in re.findall(r"\b(\w+) = (-?\d+) : i32", line)}
        calls.append((name, ints))
    return calls


def _specs(b, t, s, h, kh, d, dtype, dv=None):
    dv = dv or d
    return [jax.ShapeDtypeStruct(shape, dtype)
            for shape in ((b, t, h, d), (b, s, kh, d), (b, s, kh, dv), (b, t, h, dv))]


def _extras(b, t, s, h, features):
    """Array arguments (as abstract shapes) for the optional features a case asks for."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    shapes = {"kv_lengths": i32(b), "q_positions": i32(b, t), "q_segment_ids": i32(b, t),
              "kv_segment_ids": i32(b, s),
              "alibi_slopes": jax.ShapeDtypeStruct((h,), jnp.float32)}
    return {name: shapes[name] for name in features}


def _programs(backend, static):
    """(forward, forward + vjp) through the dispatch, as ops.attention would call it."""
    def forward(q, k, v, extras):
        return dispatch.attention(q, k, v, backend=backend, **static, **extras)

    def forward_backward(q, k, v, do, extras):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, extras), q, k, v)
        return (out, *vjp(do))

    return forward, forward_backward


# ---------------------------------------------------------------------- GPU (Triton)

GPU_FLASH = {
    # name: (b, t, s, h, kh, d, dv, dtype, static kwargs, array features)
    "d64_gqa4_causal_t100": (1, 100, 100, 8, 2, 64, 64, jnp.bfloat16,
                             dict(causal=True), ()),
    "d128_gqa4_window_t300": (2, 300, 300, 8, 2, 128, 128, jnp.bfloat16,
                              dict(causal=True, sliding_window=64), ()),
    "d128_mha_symmetric_window_t_lt_s": (1, 130, 200, 4, 4, 128, 128, jnp.float16,
                                         dict(sliding_window=48), ()),
    "d64_packed_softcap_alibi_lengths": (
        2, 77, 77, 8, 2, 64, 64, jnp.bfloat16, dict(causal=True, softcap=30.0),
        ("kv_lengths", "q_segment_ids", "kv_segment_ids", "alibi_slopes")),
    "d80_dv48_mqa_float32": (1, 40, 40, 8, 1, 80, 48, jnp.float32, dict(causal=True), ()),
}


@pytest.mark.parametrize("name", sorted(GPU_FLASH))
def test_flash_lowers_to_triton(name):
    b, t, s, h, kh, d, dv, dtype, static, features = GPU_FLASH[name]
    q, k, v, do = _specs(b, t, s, h, kh, d, dtype, dv)
    extras = _extras(b, t, s, h, features)
    forward, forward_backward = _programs("triton", static)

    calls = _kernel_calls(_export(forward, "cuda", q, k, v, extras), TRITON_CALL)
    assert [n for n, _ in calls] == ["flash_fwd"]
    launch = tiles.default_block_sizes(tiles.next_pow2(d))  # d is zero-padded to 2^n
    assert calls[0][1]["num_warps"] == launch.num_warps
    assert calls[0][1]["num_stages"] == launch.num_stages

    calls = _kernel_calls(_export(forward_backward, "cuda", q, k, v, do, extras), TRITON_CALL)
    names = collections.Counter(n for n, _ in calls)
    assert names == {"flash_fwd": 1, "flash_bwd_dq": 1, "flash_bwd_dkv": 1}, names
    grids = {n: (a["grid_y"], a["grid_z"]) for n, a in calls}
    # One program per (batch, query head) for fwd/dq; per (batch, kv head) for dk/dv,
    # which walks the g query heads of its group itself (K/V are never repeated).
    assert grids == {"flash_fwd": (b, h), "flash_bwd_dq": (b, h), "flash_bwd_dkv": (b, kh)}


def test_ring_attention_blocks_lower_to_triton():
    """Context parallelism's per-block attention on GPU (ops/ring.py with
    implementation="pallas"): the flash forward returning its lse (NEG for rows that see
    nothing) and the flash backward from the ring's global out and lse, one kernel each."""
    from jaxlm.ops import ring
    b, t, s, h, kh, d = 1, 96, 192, 8, 2, 64   # a key block longer than the queries
    spec = ring.RingSpec("sequence", True, None, d ** -0.5, None, 2, "pallas", "triton")
    q, k, v, do = _specs(b, t, s, h, kh, d, jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)

    def forward(q, k, v, qpos, kpos, qseg, kseg):
        return ring._flash_block_fwd(spec, q, k, v, qpos, kpos, qseg, kseg, None)

    def backward(q, k, v, qpos, kpos, qseg, kseg, out, lse, do):
        return ring._flash_block_bwd(spec, q, k, v, qpos, kpos, qseg, kseg, None, out, lse, do)

    pos = (i32(b, t), i32(b, s), i32(b, t), i32(b, s))
    calls = _kernel_calls(_export(forward, "cuda", q, k, v, *pos), TRITON_CALL)
    assert [n for n, _ in calls] == ["flash_fwd"]
    calls = _kernel_calls(_export(backward, "cuda", q, k, v, *pos, do, lse, do), TRITON_CALL)
    assert collections.Counter(n for n, _ in calls) == {"flash_bwd_dq": 1, "flash_bwd_dkv": 1}


GPU_DECODE = {
    # name: (b, t, s, h, kh, d, static kwargs); s is not a multiple of any tile
    "d128_gqa4_one_token": (2, 1, 500, 8, 2, 128, dict(causal=True)),
    "d64_gqa4_three_tokens_window": (1, 3, 1000, 8, 2, 64,
                                     dict(causal=True, sliding_window=256)),
}


@pytest.mark.parametrize("name", sorted(GPU_DECODE))
def test_decode_lowers_to_triton(name):
    b, t, s, h, kh, d, static = GPU_DECODE[name]
    assert dispatch.use_decode(t, s)
    q, k, v, do = _specs(b, t, s, h, kh, d, jnp.bfloat16)
    extras = _extras(b, t, s, h, ("kv_lengths", "q_positions"))
    forward, forward_backward = _programs("triton", static)

    calls = _kernel_calls(_export(forward, "cuda", q, k, v, extras), TRITON_CALL)
    assert [n for n, _ in calls] == ["flash_decode"]
    grid = calls[0][1]
    assert (grid["grid_y"], grid["grid_z"]) == (b, kh)  # splits × batch × kv heads
    assert grid["grid_x"] > 1  # the cache really is cut into parallel splits

    # Gradients reuse flash's backward kernels.
    calls = _kernel_calls(_export(forward_backward, "cuda", q, k, v, do, extras), TRITON_CALL)
    names = collections.Counter(n for n, _ in calls)
    assert names == {"flash_decode": 1, "flash_bwd_dq": 1, "flash_bwd_dkv": 1}, names


# ------------------------------------------------------------------ TPU (splash, Mosaic)

TPU_SPLASH = {
    # name: (b, t, s, h, kh, d, static kwargs, array features); splash wants t, s % 128 == 0
    "d128_gqa4_causal": (1, 256, 256, 8, 2, 128, dict(causal=True), ()),
    "d64_gqa4_window_softcap_lengths_segments": (
        2, 128, 384, 8, 2, 64, dict(causal=True, sliding_window=100, softcap=30.0),
        ("kv_lengths", "q_segment_ids", "kv_segment_ids")),
}


@pytest.mark.parametrize("name", sorted(TPU_SPLASH))
def test_splash_lowers_to_mosaic(name):
    b, t, s, h, kh, d, static, features = TPU_SPLASH[name]
    q, k, v, do = _specs(b, t, s, h, kh, d, jnp.bfloat16)
    extras = _extras(b, t, s, h, features)
    forward, forward_backward = _programs("tpu", static)
    phase = lambda kernel: re.match(r"splash_mqa_(fwd|dq|dkv)", kernel).group(1)

    calls = _kernel_calls(_export(forward, "tpu", q, k, v, extras), TPU_CALL)
    assert [phase(n) for n, _ in calls] == ["fwd"]
    calls = _kernel_calls(_export(forward_backward, "tpu", q, k, v, do, extras), TPU_CALL)
    assert sorted(phase(n) for n, _ in calls) == ["dkv", "dq", "fwd"]
