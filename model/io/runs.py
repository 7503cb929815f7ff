"""Run directories written by jaxlm's trainer, and the reading inference needs.

    RUN/run.json                 {"model": Config fields, "tokenizer": "byte" | "tokenizer.json", ...}
    RUN/tokenizer.json           when the run trained a BPE
    RUN/checkpoints/<step>/      orbax: item "params" (model parameters), item
                                 "non_params" (the other variables: router biases; only
                                 for models that have them) plus the trainer's own
                                 items (optimizer, data position, ...)

Reading never executes code: run.json is JSON and orbax stores arrays, no pickle.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ..build import (SplitModel, abstract_model, initial_non_params, non_param_shardings,
                     param_shardings)
from ..config import Config
from ..sharding import state_shardings
from .tokenizer import load_tokenizer

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
PARAMS_ITEM, NON_PARAMS_ITEM = "params", "non_params"


def write_run_file(run_dir: str, cfg: Config, tokenizer_spec: str, **extra) -> None:
    os.makedirs(run_dir, exist_ok=True)
    meta = {"model": cfg.to_dict(), "tokenizer": tokenizer_spec, **extra}
    tmp = os.path.join(run_dir, f"{RUN_FILE}.{os.getpid()}.tmp")  # one per process
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, RUN_FILE))  # atomic: never half-written


def read_run_file(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir!r} is not a jaxlm run directory (no {RUN_FILE}); "
                         f"pass the folder that `python -m jaxlm.train` wrote")
    with open(path) as f:
        return json.load(f)


def checkpoint_manager(run_dir: str, *, read_only: bool = False, max_to_keep=None,
                       item_names=(PARAMS_ITEM,)) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)),
                                 options=options, item_names=item_names)


def params_of(lm: nnx.Module):
    """The parameters as a plain nested dict of arrays (what orbax stores)."""
    return nnx.state(lm, nnx.Param).to_pure_dict()


def save_model(lm, run_dir: str, tokenizer=None, **extra) -> None:
    """Save lm (float or quantized, no adapter) as a run directory that load_run, the
    engine's and server's `--checkpoint`, and `--init` read: run.json with the Config
    (a quantized model's says how, so it is rebuilt quantized and loaded as stored, never
    re-quantized) and one orbax checkpoint (step 0) of its parameters and its other
    variables (the quantized weights' values and scales, router biases). tokenizer: None
    (bytes), or a tokenizer.json path, copied beside."""
    import shutil
    from ..peft import adapters_of
    if adapters_of(lm):
        raise ValueError("save_model saves a base model; save the adapter with save_peft "
                         "(or merge it into a float model first)")
    if os.path.exists(os.path.join(run_dir, RUN_FILE)) or os.path.isdir(
            os.path.join(run_dir, CHECKPOINTS)):
        raise ValueError(f"{run_dir!r} already holds a run; pick a new directory")
    os.makedirs(run_dir, exist_ok=True)
    spec = "byte"
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(run_dir, "tokenizer.json"))
        spec = "tokenizer.json"
    _, params, rest = nnx.split(lm, nnx.Param, ...)
    items = {PARAMS_ITEM: params.to_pure_dict()}
    if jax.tree.leaves(rest):
        items[NON_PARAMS_ITEM] = rest.to_pure_dict()
    mngr = checkpoint_manager(run_dir, item_names=tuple(items))
    mngr.save(0, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v)
                                            for k, v in items.items()}))
    mngr.wait_until_finished()
    mngr.close()
    write_run_file(run_dir, lm.cfg, spec, **extra)   # last: a run.json means a whole run


def load_run(run_dir: str, step: int | None = None, dtype: str | None = None, mesh=None):
    """(CausalLM, tokenizer, step) from a trainer run directory; latest step by default.
    With a mesh, orbax restores every variable directly into its shards. A run saved
    before router biases were checkpointed gets their initial values."""
    meta = read_run_file(run_dir)
    if meta.get("peft") or meta.get("heads_only"):
        return _load_adapter_run(run_dir, meta, step, dtype, mesh)
    cfg = Config.from_dict(meta["model"])
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    mngr = checkpoint_manager(run_dir, read_only=True, item_names=(PARAMS_ITEM, NON_PARAMS_ITEM))
    step = _pick_step(mngr, run_dir, step)
    split = SplitModel(abstract_model(cfg))
    sharded = mesh is not None
    targets = {PARAMS_ITEM: _target(split.params, param_shardings(cfg, mesh) if sharded else None)}
    if split.rest and _has_item(run_dir, step, NON_PARAMS_ITEM):
        where = non_param_shardings(cfg, mesh) if sharded else None
        targets[NON_PARAMS_ITEM] = _target(split.rest.to_pure_dict(), where)
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardRestore(v) for k, v in targets.items()}))
    mngr.close()
    if NON_PARAMS_ITEM in targets:
        rest = restored[NON_PARAMS_ITEM]
    else:
        rest = initial_non_params(cfg) if split.rest else split.rest
    return (split.merge(restored[PARAMS_ITEM], rest),
            load_tokenizer(meta["tokenizer"], base_dir=run_dir), step)


def _pick_step(mngr, run_dir: str, step: int | None) -> int:
    """`step` (checked to be saved), or the latest saved step."""
    steps = mngr.all_steps()
    if not steps:
        mngr.close()
        raise ValueError(f"{run_dir!r} has no checkpoints yet under {CHECKPOINTS}/")
    if step is not None and step not in steps:
        mngr.close()
        raise ValueError(f"step {step} is not in {run_dir!r}; saved steps: {sorted(steps)}")
    return max(steps) if step is None else step


def latest_step(run_dir: str) -> int:
    mngr = checkpoint_manager(run_dir, read_only=True, item_names=(PARAMS_ITEM,))
    step = _pick_step(mngr, run_dir, None)
    mngr.close()
    return step


def _load_adapter_run(run_dir: str, meta: dict, step, dtype, mesh):
    """An adapter or heads-only run: its base (from run.json's reference, checked by
    content hash) with the trained adapter attached or MTP / Medusa heads added; the
    checkpoint's params item is the adapter (or the heads) alone."""
    from .. import peft
    from ..build import with_heads
    from ..heads import HEADS
    from .base_ref import load_base
    ref = meta["base"]
    base, _ = load_base(ref["path"], dtype or meta["model"].get("dtype"), ref.get("step"),
                        mesh, expect=ref["sha256"])
    if meta.get("peft"):
        model, trainable = peft.attach(base, peft.spec_from_dict(meta["peft"])), peft.Adapter
    else:
        model, trainable = with_heads(base, meta["model"]["mtp_depth"],
                                      meta["model"]["medusa_heads"]), HEADS
    # on a mesh the adapter (or heads) is restored into its shards, beside the base's
    where = None if mesh is None else state_shardings(nnx.state(model, trainable),
                                                        mesh).to_pure_dict()
    split = SplitModel(model, trainable=trainable)
    mngr = checkpoint_manager(run_dir, read_only=True, item_names=(PARAMS_ITEM,))
    step = _pick_step(mngr, run_dir, step)
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{PARAMS_ITEM: ocp.args.StandardRestore(_target(split.params, where))}))
    mngr.close()
    return (split.merge(restored[PARAMS_ITEM]),
            load_tokenizer(meta["tokenizer"], base_dir=run_dir), step)


def _target(tree, shardings=None):
    """What orbax restores into: shapes and dtypes, and the shards when given."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    if shardings is None:
        return target
    return jax.tree.map(lambda x, s: x.update(sharding=s), target, shardings)


def _has_item(run_dir: str, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, CHECKPOINTS, str(step), item))
