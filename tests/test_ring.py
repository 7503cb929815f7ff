"""Context-parallel attention (ops.ring): ring and all-gather over a 'sequence' mesh axis."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import ops
from jaxlm.ops import ring


def test_ring_and_allgather_equal_one_device_on_8_emulated_devices():
    """tests/scripts/ring_check.py, 8 emulated CPU devices: ring and all-gather attention
    in shard_map equal the single-device ops.attention to 1e-5 (output and dq, dk, dv) for
    causal and bidirectional masks, GQA/MHA/MQA, sliding windows (small enough that whole
    block pairs are skipped), packed documents, softcap, ALiBi, dv != d, hidden key slots
    and queries that see no key, a key block twice the queries', zigzag, contiguous and
    random token orders, a data×sequence mesh, odd local lengths, chunks 1/2/4 and the
    Pallas kernels (interpret mode). The ring's per-device memory (XLA's memory analysis
    of value_and_grad at T = 8k and 16k over 8 devices) depends on T/N only, grows
    linearly with it, stays under the full K/V and half the all-gather's, and no array of
    its per-device program has the full length (the all-gather's does)."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "ring_check.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                         timeout=900)
    log = out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, log[-6000:]
    assert "all ring checks passed" in out.stdout, log[-6000:]


def _inputs(b=1, t=4, s=None, h=2, kh=1, d=8):
    s = t if s is None else s
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))
    return q, k, v, jnp.arange(t)[None], jnp.arange(s)[None]


@pytest.mark.parametrize("variant", ring.VARIANTS)
def test_argument_errors_are_value_errors_naming_the_problem(variant):
    """Checked before any collective, so a direct call (no shard_map) raises them."""
    q, k, v, qpos, kpos = _inputs()
    call = lambda **kw: ring.context_attention(  # noqa: E731
        q, k, v, variant=variant, axis_name="sequence", **kw)
    with pytest.raises(ValueError, match="needs q_positions and kv_positions"):
        call(q_positions=None, kv_positions=kpos)
    with pytest.raises(ValueError, match="needs q_positions and kv_positions"):
        call(q_positions=qpos, kv_positions=None)
    with pytest.raises(ValueError, match="pass both q_segment_ids and kv_segment_ids"):
        call(q_positions=qpos, kv_positions=kpos, q_segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="pass both q_segment_ids and kv_segment_ids"):
        call(q_positions=qpos, kv_positions=kpos, kv_segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="h a multiple of k"):
        ring.context_attention(q, k[:, :, [0, 0, 0]], v[:, :, [0, 0, 0]], variant=variant,
                               axis_name="sequence", q_positions=qpos, kv_positions=kpos)


def test_ring_only_errors():
    q, k, v, qpos, kpos = _inputs(t=6)
    kw = dict(axis_name="sequence", q_positions=qpos, kv_positions=kpos)
    with pytest.raises(ValueError, match=r"chunks=4 must be a positive int dividing the local "
                                         r"query and key lengths \(6 and 6\)"):
        ring.ring_attention(q, k, v, chunks=4, **kw)
    q2, k2, v2, qpos2, kpos2 = _inputs(t=4, s=6)   # a longer key block: chunks divide both
    with pytest.raises(ValueError, match=r"chunks=4 must be .* \(4 and 6\)"):
        ring.ring_attention(q2, k2, v2, axis_name="sequence", q_positions=qpos2,
                            kv_positions=kpos2, chunks=4)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        ring.ring_attention(q, k, v, sliding_window=0, **kw)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"chunks={bad} must be a positive int"):
            ring.ring_attention(q, k, v, chunks=bad, **kw)
    with pytest.raises(ValueError, match="implementation='bogus'"):
        ring.ring_attention(q, k, v, implementation="bogus", **kw)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[h\]=\(2,\)"):
        ring.ring_attention(q, k, v, alibi_slopes=jnp.ones(3), **kw)
    with pytest.raises(ValueError, match=r"context-parallel variant 'rings'; choose one of "
                                         r"\('ring', 'allgather'\)"):
        ring.context_attention(q, k, v, variant="rings", **kw)


def test_a_ring_of_one_device_is_ops_attention():
    """One device on the axis (the ring's loop runs no shift forward, one backward): the
    output and gradients equal ops.attention; an error raised while tracing inside
    shard_map reaches the caller as the same ValueError."""
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    q, k, v, pos, _ = _inputs(b=2, t=6, h=4, kh=2)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    spec = P(None, "sequence")
    kw = dict(causal=True, sliding_window=4, softcap=3.0)

    def cp(variant, **extra):
        def local(q, k, v, p, s):
            return ring.context_attention(q, k, v, variant=variant, axis_name="sequence",
                                          q_positions=p, kv_positions=p, q_segment_ids=s,
                                          kv_segment_ids=s, **kw, **extra)
        return lambda q, k, v: jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5,
                                             out_specs=spec, check_vma=False)(q, k, v, pos, seg)

    def ref(q, k, v):
        return ops.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                             kv_segment_ids=seg, **kw)

    def out_and_grads(f):   # the output, and dq, dk, dv of sum(sin(out))
        return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(
            lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)))

    want = out_and_grads(ref)(q, k, v)
    for variant in ring.VARIANTS:
        got = out_and_grads(cp(variant))(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=variant)
    with pytest.raises(ValueError, match="chunks=4 must be a positive int dividing the local"):
        cp("ring", chunks=4)(q, k, v)
