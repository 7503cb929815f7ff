"""The trainer's checkpoints: orbax, asynchronous, atomic, the newest K kept.

Each step folder RUN/checkpoints/<step>/ holds these items:
    params      the model parameters     } what `jaxlm.model.io.runs.load_run`
    non_params  the router biases, only  }   reads
                for models that have them
    train       the rest of the TrainState: optax state, step, loss scale
    data        the data iterator's position, JSON ({"next_index": n})
Orbax writes each step into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and no half step.
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from flax import serialization

from jaxlm.model.io.runs import NON_PARAMS_ITEM, PARAMS_ITEM, checkpoint_manager

from .step import TrainState

TRAIN_ITEM, DATA_ITEM = "train", "data"
ITEMS = (PARAMS_ITEM, NON_PARAMS_ITEM, TRAIN_ITEM, DATA_ITEM)


def _abstract(tree):
    """Shapes, dtypes and shardings of the template: orbax restores each array straight
    into the template's shards (any mesh, any number of processes), never whole first."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)


def _train_item(state: TrainState) -> dict:
    """The TrainState less what has an item of its own (what inference reads)."""
    return serialization.to_state_dict(state.replace(params=None, rest=None))


class Checkpointer:
    def __init__(self, run_dir: str, keep: int):
        self.mngr = checkpoint_manager(run_dir, max_to_keep=keep, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, state: TrainState, data_state: dict) -> None:
        """Starts an asynchronous save of this step (arrays are copied to host before
        this returns, so the state may be donated to the next step at once)."""
        step = int(state.step)
        if step in self.mngr.all_steps():
            return
        items = {PARAMS_ITEM: ocp.args.StandardSave(state.params),
                 TRAIN_ITEM: ocp.args.StandardSave(_train_item(state)),
                 DATA_ITEM: ocp.args.JsonSave(data_state)}
        if state.rest:  # orbax refuses an empty tree
            items[NON_PARAMS_ITEM] = ocp.args.StandardSave(state.rest)
        self.mngr.save(step, args=ocp.args.Composite(**items))

    def restore(self, template: TrainState, step: int | None = None):
        """(TrainState, data iterator state) of `step` (default: the latest), shaped like
        `template` (an initialised state of the same config)."""
        step = self.latest_step() if step is None else step
        items = {PARAMS_ITEM: ocp.args.StandardRestore(_abstract(template.params)),
                 TRAIN_ITEM: ocp.args.StandardRestore(_abstract(_train_item(template))),
                 DATA_ITEM: ocp.args.JsonRestore()}
        if template.rest:
            items[NON_PARAMS_ITEM] = ocp.args.StandardRestore(_abstract(template.rest))
        got = self.mngr.restore(step, args=ocp.args.Composite(**items))
        state = serialization.from_state_dict(template.replace(params=None, rest=None),
                                              got[TRAIN_ITEM])
        rest = got[NON_PARAMS_ITEM] if NON_PARAMS_ITEM in items else template.rest
        return state.replace(params=got[PARAMS_ITEM], rest=rest), got[DATA_ITEM]

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
