"""One mesh, one table of rules: logical axis names → mesh axes.

Parameters carry logical names ('embed', 'heads', 'mlp', …) as NNX metadata; the
activations and caches use the names below. Model maths never mentions a mesh
axis: sharding is JAX's own runtime (jax.jit with NamedSharding over a Mesh).

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    lm = build.create(cfg, seed, mesh)       # parameters born sharded, never gathered
    batch = global_batch(host_arrays, mesh)  # rows over data/fsdp/expert, any number of hosts

Multi-host: every process calls init_distributed(...) first; make_mesh then spans the
devices of all processes (jax.devices() is global) and jit runs one SPMD program.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

# logical name → mesh axes it may be split over (in order); None = replicated.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),   # activations and caches: rows
    "embed": ("fsdp",),                    # FSDP shards the model width of every weight
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "length": ("sequence",),               # activations' time / cache slots
    "layers": None,
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' → {'data': 2, 'fsdp': 2, 'tensor': 2}; one size may be -1."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} in {spec!r} is unknown; use {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: write axis=size, e.g. data=2,tensor=4") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ValueError(f"mesh axis {name!r} has size {sizes[name]}; use >= 1 or -1 (the rest)")
    if not sizes:
        raise ValueError(f"empty mesh spec {spec!r}; e.g. data=2,fsdp=2,tensor=2")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with the named axis sizes."""
    sizes = dict(parse_mesh_spec(spec) if isinstance(spec, str) else spec)
    devices = list(jax.devices() if devices is None else devices)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError("only one mesh axis may have size -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{len(devices)} are available; make the sizes multiply to that")
    # Auto axes: XLA's partitioner propagates shardings from inputs/outputs, so model
    # maths needs no per-op sharding annotations (jax.make_mesh defaults to Explicit).
    auto = (jax.sharding.AxisType.Auto,) * len(sizes)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices, axis_types=auto)


# Logical names whose dimension is expected to be smaller than the mesh axes their rule
# names, and then replicate instead of raising: a GQA model has fewer kv heads than
# tensor-parallel ranks (each rank then keeps every kv head), and a decode batch can be
# a single row. Any other dimension that an axis does not divide is a misconfigured mesh.
REPLICABLE = frozenset({"kv_heads", "batch"})


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES, *,
                    what: str = "array", replicable=REPLICABLE) -> P:
    """The PartitionSpec for one array: each dim takes the mesh axes its rule lists,
    skipping axes already used or absent (size 1) from the mesh. An axis that does not
    divide its dim is a ValueError naming `what`, the dim and the axis, unless the dim's
    logical name is in `replicable` (then that axis is skipped)."""
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        axes = []
        for axis in (rules.get(name) or ()) if name is not None else ():
            if axis in used or axis not in mesh.shape or mesh.shape[axis] == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]):
                if name in replicable:
                    continue
                raise ValueError(
                    f"{what}: dimension {dim} ({name!r}, size {size}) does not split over "
                    f"mesh axis {axis!r} (size {mesh.shape[axis]})"
                    f"{' after ' + str(axes) if axes else ''}; choose mesh sizes that "
                    f"divide it, or map {name!r} to other axes in the rules")
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES, *, drop: int = 0):
    """NamedShardings for every variable of an (abstract) NNX state, from its metadata.
    drop: leading logical names to skip, for slices of a stacked state (one layer of the
    scanned 'layers' stack: drop=1)."""
    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * (len(var.shape) + drop)
        spec = logical_to_spec(tuple(names)[drop:], var.shape, mesh, rules,
                               what=f"parameter {jax.tree_util.keystr(path)}")
        return var.replace(NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(one, state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                        rules=DEFAULT_RULES, what: str = "activation") -> NamedSharding:
    """Sharding of an activation/cache/batch array from logical names, e.g. ('batch', 'length')."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, what=what))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0,
                   rules=DEFAULT_RULES, length_dim: int | None = None) -> NamedSharding:
    """Rows (dim `batch_dim`) split over the 'batch' rule's axes and, with length_dim,
    that dim over the 'length' rule's (the 'sequence' axis); other dims replicated."""
    names = [None] * len(shape)
    names[batch_dim] = "batch"
    if length_dim is not None:
        names[length_dim] = "length"
    return activation_sharding(mesh, names, shape, rules)


def global_batch(batch, mesh: Mesh, batch_dim: int = 0, rules=DEFAULT_RULES,
                 length_dim: int | None = None):
    """Host numpy arrays holding the whole global batch → jax Arrays sharded over the
    mesh by rows (and by positions along length_dim, for context parallelism). Every
    process passes the same global batch (token ids: a few KB) and contributes only the
    pieces its own devices hold, so one call serves one host and many.
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.shape, batch_dim, rules, length_dim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, batch)


def expert_parallel_size(mesh=None) -> int:
    """Size of the 'expert' axis of the mesh in context (jax.set_mesh), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return 1
    return dict(mesh.shape).get("expert", 1)


def init_distributed(coordinator: str = "", num_processes: int = 1, process_id: int = 0):
    """Join a multi-process (multi-host) run through jax.distributed, before any device
    is touched. coordinator: "" (one process: nothing to do), "auto" (let JAX detect the
    cluster: Cloud TPU, SLURM, Open MPI, Kubernetes), or "HOST:PORT" of process 0 with
    num_processes and this process's process_id. CPU processes talk through gloo."""
    if not coordinator:
        if num_processes != 1:
            raise ValueError(f"num_processes={num_processes} needs a coordinator "
                             f"HOST:PORT (or 'auto')")
        return
    # CPU collectives across processes need an implementation; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes < 2 or not 0 <= process_id < num_processes:
        raise ValueError(f"a coordinator needs num_processes >= 2 and 0 <= process_id < "
                         f"num_processes; got {num_processes} and {process_id}")
    jax.distributed.initialize(coordinator, num_processes, process_id)
