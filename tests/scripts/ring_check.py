"""Context-parallel attention (ops.ring) on 8 emulated CPU devices against one device.

tests/test_ring.py starts this in a subprocess. Every case lays a random sequence out over
the mesh's 'sequence' axis (zigzag, contiguous or a random order), runs ring_attention and
allgather_attention inside jax.shard_map, puts the output back in sequence order and
compares it, and the gradients of q, k and v (through a random cotangent), with the
single-device XLA ops.attention on the whole sequence (one case also with a plain numpy
softmax). Then the ring's per-device memory from XLA's memory analysis of the compiled
value_and_grad. One line per case; the first failure exits non-zero naming the case.
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlm import ops  # noqa: E402
from jaxlm.ops import ring  # noqa: E402

ATOL = 1e-5   # float32, absolute, on the output and every gradient (entries are O(1))
AXIS = "sequence"
HIDDEN = 2 ** 30   # model/context.py's position of an unfilled cache slot
START = time.time()
SEEDS = list(range(100))


def fail(case, msg):
    print(f"FAIL [{case}]: {msg}", flush=True)
    sys.exit(1)


def mesh_of(sizes, names):
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                         devices=jax.devices()[:int(np.prod(sizes))])


def order_of(kind, T, n, rng):
    """Token order over the ring: device i's block is order[i*T/n:(i+1)*T/n]."""
    if kind == "zigzag":   # device i holds chunks i and 2n-1-i of 2n
        c = np.arange(T).reshape(2 * n, T // (2 * n))
        return np.concatenate([np.concatenate([c[i], c[2 * n - 1 - i]]) for i in range(n)])
    if kind == "contiguous":
        return np.arange(T)
    return rng.permutation(T)   # any order works: masks come from global positions


def packed(b, T, rng, mean_len=7):
    """(positions, segment ids) of documents packed along each row, as a trainer gives
    them: ids increase along the row, positions restart at 0 in every document."""
    seg = np.zeros((b, T), np.int32)
    pos = np.zeros((b, T), np.int32)
    for r in range(b):
        starts = np.sort(rng.choice(np.arange(1, T), size=T // mean_len, replace=False))
        seg[r] = np.searchsorted(starts, np.arange(T), side="right")
        pos[r] = np.arange(T) - np.concatenate([[0], starts])[seg[r]]
    return pos, seg


def hidden_pairs(order, korder, n, chunks, qpos, kpos, seg, causal, window):
    """(fully masked, all) (query sub-block, key sub-block) pairs over every device and
    ring step, in row 0: how much the ring's skip removes (shows the case exercises it)."""
    m = n * chunks
    qp, kp = qpos[0][order].reshape(m, -1), kpos[0][korder].reshape(m, -1)
    sg = None if seg is None else seg[0][order].reshape(m, -1)
    hidden = 0
    for i in range(m):
        for j in range(m):
            diff = qp[i][:, None] - kp[j][None, :]
            ok = np.ones(diff.shape, bool)
            if causal:
                ok &= diff >= 0
            if window is not None:
                ok &= diff < window
                if not causal:
                    ok &= -diff < window
            if sg is not None:
                ok &= sg[i][:, None] == sg[j][None, :]
            hidden += not ok.any()
    return hidden, m * m


def numpy_attention(q, k, v, pos, causal, window, scale):
    """Plain softmax attention, one (row, head, query) at a time."""
    b, T, h, _ = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, T, h, v.shape[-1]))
    for r in range(b):
        for hd in range(h):
            for i in range(T):
                z = k[r, :, hd // g] @ q[r, i, hd] * scale
                ok = np.ones(T, bool)
                if causal:
                    ok &= pos[r] <= pos[r, i]
                if window is not None:
                    ok &= pos[r, i] - pos[r] < window
                p = np.exp(z[ok] - z[ok].max())
                out[r, i, hd] = (p / p.sum()) @ v[r, ok, hd // g]
    return out


POOL = 1 << 14
_draw = jax.jit(lambda key: jax.random.normal(key, (POOL,), jnp.float32))


def normal(key, shape):
    """jax.random.normal of one fixed size, reshaped: one compile for every shape (a
    jax.random.normal per shape compiles each time, ~1-2 s apiece here)."""
    n = int(np.prod(shape))
    assert n <= POOL, shape
    return jnp.asarray(np.asarray(_draw(key))[:n].reshape(shape))


def fwd_and_grads(fn):
    """jit of (out, (dq, dk, dv)) of fn(q, k, v) for a given cotangent of out."""
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)
    return jax.jit(run)


def compare(case, got, want):
    errs = []
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            fail(case, f"{name} shape {a.shape} != {b.shape}")
        if not np.isfinite(a).all():
            fail(case, f"{name} is not finite")
        if not np.abs(b).max() > 0.1:
            fail(case, f"the reference {name} is ~0: nothing compared")
        err = float(np.abs(a - b).max())
        if not err <= ATOL:
            fail(case, f"{name} max |diff| {err:.3g} > {ATOL:g} (max |ref| "
                       f"{float(np.abs(b).max()):.3g})")
        errs.append(err)
    return errs


def run_case(name, *, n=8, T=64, b=2, h=4, kh=2, d=8, dv=None, order="zigzag",
             causal=True, window=None, segments=False, softcap=None, alibi=False,
             hide_keys=False, S=None, data=1, variants=("ring", "allgather"),
             chunks=(None,), implementation="xla", numpy_ref=False):
    """T queries; S keys (default T): with S > T the queries are the last T of S
    positions, as a prefill over a cache's slots."""
    dv = dv or d
    S = S or T
    seed = SEEDS.pop(0)   # fixed, and different for every case
    rng = np.random.RandomState(seed)
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k = normal(ks[0], (b, T, h, d)), normal(ks[1], (b, S, kh, d))
    v, ct = normal(ks[2], (b, S, kh, dv)), normal(ks[3], (b, T, h, dv))
    seg = None
    if segments:
        assert S == T
        pos, seg = packed(b, T, rng)
        kpos = pos
    else:
        kpos = np.broadcast_to(np.arange(S, dtype=np.int32), (b, S)).copy()
        pos = kpos[:, S - T:].copy()
    if hide_keys:   # keys 2 positions late (the first queries see none), a hidden tail
        length = rng.randint(S // 2, S, size=(b, 1))
        kpos = np.where(np.arange(S)[None] < length, kpos + 2, HIDDEN).astype(np.int32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, h + 1), jnp.float32) if alibi else None
    kw = dict(causal=causal, sliding_window=window, softcap=softcap, alibi_slopes=slopes)
    segs = (None, None) if seg is None else (jnp.asarray(seg), jnp.asarray(seg))

    want = fwd_and_grads(lambda q, k, v: ops.attention(
        q, k, v, q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(kpos),
        q_segment_ids=segs[0], kv_segment_ids=segs[1], **kw))(q, k, v, ct)
    if numpy_ref:
        ref = numpy_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), pos, causal,
                              window, d ** -0.5)
        err = float(np.abs(np.asarray(want[0]) - ref).max())
        if not err <= ATOL:
            fail(name, f"ops.attention vs numpy softmax attention: {err:.3g}")
        print(f"ok  {name + ' / ops.attention vs numpy':52s} out {err:.1e}", flush=True)

    mesh = mesh_of((data, n), ("data", AXIS)) if data > 1 else mesh_of((n,), (AXIS,))
    spec = P("data" if data > 1 else None, AXIS)
    perm = order_of(order, T, n, rng)
    kperm = perm if S == T else order_of(order, S, n, rng)
    inv = np.argsort(perm)
    qz, kz = jnp.asarray(pos[:, perm]), jnp.asarray(kpos[:, kperm])
    sz = None if seg is None else jnp.asarray(seg[:, perm])
    for variant in variants:
        for c in chunks:
            extra = {} if c is None or variant == "allgather" else {"chunks": c}
            if implementation != "xla":
                extra["implementation"] = implementation

            def local(q, k, v, qp, kp, s, variant=variant, extra=extra):
                return ring.context_attention(q, k, v, variant=variant, axis_name=AXIS,
                                              q_positions=qp, kv_positions=kp,
                                              q_segment_ids=s, kv_segment_ids=s,
                                              **kw, **extra)

            def cp(q, k, v, local=local):
                out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5 + (
                    None if sz is None else spec,), out_specs=spec, check_vma=False)(
                    q[:, perm], k[:, kperm], v[:, kperm], qz, kz, sz)
                return out[:, inv]

            label = f"{name} / {variant}" + ("" if "chunks" not in extra else f" chunks={c}")
            errs = compare(label, fwd_and_grads(cp)(q, k, v, ct), want)
            skip = ""
            if variant == "ring":
                cc = c or (2 if (T // n) % 2 == 0 and (S // n) % 2 == 0 else 1)
                hid, tot = hidden_pairs(perm, kperm, n, cc, pos, kpos, seg, causal, window)
                skip = f"  skips {hid}/{tot} pairs"
            print(f"ok  {label:52s} out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  "
                  f"dv {errs[3]:.1e}{skip}  [{time.time() - START:.0f}s]", flush=True)


# ------------------------------------------------------------------- forward and grads

run_case("causal GQA h4/k2, zigzag, N=8", numpy_ref=True)
run_case("non-causal", causal=False)
run_case("MHA h4/k4", kh=4)
run_case("MQA h4/k1", kh=1)
run_case("sliding window 5", window=5)
run_case("sliding window 20", window=20)
run_case("packed documents, positions restart", segments=True)
run_case("non-causal packed documents, window 5", causal=False, segments=True, window=5)
run_case("softcap 2", softcap=2.0)
run_case("ALiBi", alibi=True)
run_case("d 12, dv 8 (MLA shape)", d=12, dv=8)
run_case("contiguous order", order="contiguous")
run_case("hidden key slots, first queries see none", hide_keys=True, alibi=True)
run_case("keys 2x the queries (s = 2t locally), hidden slots", T=32, S=64, hide_keys=True)
run_case("mesh data=2,sequence=4, rows over data", n=4, T=32, b=4, data=2, segments=True)
run_case("local t=3 (chunks 1), random order, window 6", T=24, order="random", window=6)
run_case("chunks", variants=("ring",), chunks=(1, 4))   # the default (2) is every case above
# Interpret mode is slow to compile: one sub-block per device (chunks=1; the contiguous
# order still hides 9 of the 16 block pairs) and one small case.
run_case("pallas (interpret), N=4, packed documents, dv 8", n=4, T=64, b=1, h=2, kh=1, d=16,
         dv=8, segments=True, order="contiguous", chunks=(1,), implementation="pallas")


# ----------------------------------------------------------------------------- memory
# Per-device bytes of the compiled, jitted value_and_grad (XLA's memory analysis).

B, H, D = 1, 4, 64


def memory(variant, n, T, chunks=None, scanned=False):
    """(temp bytes per device, full K/V bytes, whether any per-device array has the full
    length T) of the compiled value_and_grad. scanned: the attention is a layer of a
    2-step lax.scan, as in the model (linearizing a scan once made JAX keep every ring
    step's logits)."""
    mesh = mesh_of((n,), (AXIS,))
    spec = P(None, AXIS)
    extra = {} if chunks is None else {"chunks": chunks}

    def attend(q, k, v, p):
        def local(q, k, v, p):
            return ring.context_attention(q, k, v, variant=variant, axis_name=AXIS,
                                          q_positions=p, kv_positions=p, causal=True, **extra)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                             check_vma=False)(q, k, v, p)

    def loss(q, k, v, p):
        if scanned:
            q, _ = jax.lax.scan(lambda x, _: (x + attend(x, k, v, p), None), q, None, length=2)
            return jnp.sum(jnp.sin(q))
        return jnp.sum(jnp.sin(attend(q, k, v, p)))

    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    p = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x, p).compile()
    m = compiled.memory_analysis()
    if m is None or not getattr(m, "temp_size_in_bytes", None):
        fail("memory", f"no memory analysis from the compiled program: {m!r}")
    # the per-device program after partitioning: a full-length K/V would be f32[1,T,...]
    full_length = re.search(rf"f32\[{B},{T},", compiled.as_text()) is not None
    full_kv = 2 * B * T * H * D * 4              # every device's K and V, float32
    label = (f"{variant} N={n} T={T}" + ("" if chunks is None else f" chunks={chunks}")
             + (" in a scan" if scanned else ""))
    print(f"mem {label:30s} temp {m.temp_size_in_bytes / 2**20:7.2f} MiB  args "
          f"{m.argument_size_in_bytes / 2**20:5.2f} MiB  (full K/V {full_kv / 2**20:5.2f} MiB)"
          f"  full-length arrays: {full_length}", flush=True)
    return m.temp_size_in_bytes, full_kv, full_length


# Local lengths 1024, 2048, 4096: the default sub-blocks are 512 tokens at each, so a
# pair's logits keep their size and the rest is local blocks. Memory = a + b·T/N: its
# increments double when T doubles (a [t, t] or [t, T] buffer would quadruple them).
T1, N = 8192, 8
ring_def = [memory("ring", N, T) for T in (T1, 2 * T1, 4 * T1)]
gathered = [memory("allgather", N, T) for T in (T1, 2 * T1)]
same_t = memory("ring", N // 2, T1 // 2)
scanned = [memory("ring", N, T, scanned=True) for T in (T1, 2 * T1, 4 * T1)]
s1, s2, s3 = (r[0] for r in scanned)
s_ratio = (s3 - s2) / (s2 - s1)
print(f"mem ring in a scan: increments ratio {s_ratio:.2f}")
if not 1.6 <= s_ratio <= 2.5:
    fail("memory", f"ring temp in a scan: increments grow {s_ratio:.2f}x when T doubles")
m1, m2, m3 = (r[0] for r in ring_def)
ratio = (m3 - m2) / (m2 - m1)
print(f"mem ring increments T->2T {(m2 - m1) / 2**20:.2f} MiB, 2T->4T {(m3 - m2) / 2**20:.2f} "
      f"MiB (ratio {ratio:.2f}; linear 2, quadratic 4); allgather grows "
      f"{gathered[1][0] / gathered[0][0]:.2f}x T->2T")
if not 1.6 <= ratio <= 2.5:
    fail("memory", f"ring temp increments grow {ratio:.2f}x when T doubles: not linear in T/N")
for (temp, full_kv, full_length), T in zip(ring_def, (T1, 2 * T1, 4 * T1)):
    if full_length:
        fail("memory", f"the ring's per-device program at T={T} holds a full-length array")
    if T > T1 and not temp < full_kv:
        fail("memory", f"ring temp at T={T}: {temp} B, not below the full K/V {full_kv} B")
for (temp, _, _), (temp_ag, full_kv, ag_full), T in zip(ring_def, gathered, (T1, 2 * T1)):
    if not (ag_full and temp_ag > full_kv and temp < 0.5 * temp_ag):
        fail("memory", f"all-gather at T={T}: temp {temp_ag} B, full-length {ag_full}; it "
                       f"should hold the full K/V and more than twice the ring's {temp} B")
# The ring's memory depends on the local length only: N=4 at T/2 is N=8 at T.
if not abs(same_t[0] / m1 - 1) < 0.1:
    fail("memory", f"ring temp at N={N // 2}, T={T1 // 2}: {same_t[0]} B; at N={N}, T={T1}: "
                   f"{m1} B (same local length)")
print(f"all ring checks passed in {time.time() - START:.0f}s", flush=True)
