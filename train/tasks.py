"""`--task sft | dpo`: what a post-training run reads, how it batches and how it evaluates.

    python -m jaxlm.train --task sft --init RUN_OR_HF_DIR --data chats.jsonl [--peft SPEC]
    python -m jaxlm.train --task dpo --init RUN_OR_HF_DIR --data pairs.jsonl --loss dpo --beta 0.1

SFT packs whole examples into rows (segment ids keep them apart) and trains the ordinary
next-token step with a loss mask over the answers' tokens; its loss is normalised by the
step's target tokens over every micro-batch (and, on a mesh, every data shard), so
accumulating uneven micro-batches equals one big batch. DPO runs pairs
(train/preference.py). Both render chats with the base's own chat template (its
tokenizer_config.json / chat_template.jinja) or jaxlm's default, and copy it into the run
(tokenizer_config.json) so that serving the run renders prompts the same way.
"""
from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.build import SplitModel
from jaxlm.model.io.runs import write_run_file
from jaxlm.ops.preference import REFERENCE_FREE

from . import data as D
from . import preference as PR
from .config import TrainConfig
from .step import NEXT_TOKEN, make_eval_step

DATA_DIR = "data"


def data_files(tcfg: TrainConfig) -> tuple[str, str | None]:
    """(training file, held-out file or None). An embedded set is written into RUN/data/
    first, so the run shows exactly what it trained on."""
    if tcfg.data in EMBEDDED_TASK:
        from .examples import EMBEDDED, write_jsonl
        if tcfg.task != EMBEDDED_TASK[tcfg.data]:
            raise ValueError(f"--data {tcfg.data} is a --task {EMBEDDED_TASK[tcfg.data]} "
                             f"set, not {tcfg.task}")
        folder = os.path.join(tcfg.run_dir, DATA_DIR)
        os.makedirs(folder, exist_ok=True)
        paths = []
        for split in ("train", "val"):
            path = os.path.join(folder, f"{tcfg.data}-{split}.jsonl")
            write_jsonl(EMBEDDED[tcfg.data](split), path)
            paths.append(path)
        return paths[0], tcfg.val_data or paths[1]
    for f in (tcfg.data, tcfg.val_data):
        if f and not os.path.isfile(f):
            raise ValueError(f"--data {f!r}: no such file (give a .jsonl, or one of "
                             f"{', '.join(EMBEDDED_TASK)})")
    return tcfg.data, tcfg.val_data or None


EMBEDDED_TASK = {"stdlib-sft": "sft", "stdlib-dpo": "dpo"}


class PostTraining:
    """One post-training run's data: loaded, checked and written into run.json at
    construction (before any weight is touched, so bad data stops the run at once);
    `setup` then makes the batches, the objective and the evaluation for the model."""

    def __init__(self, tcfg: TrainConfig, cfg, resuming: bool, log=print, **run_file_extra):
        self.tcfg, self.log = tcfg, log
        self.tokenizer, tok_spec = D.make_tokenizer(tcfg.tokenizer, [], tcfg.run_dir,
                                                    resume=resuming)
        from jaxlm.model.io.chat import eos_id, load_template
        self.template = load_template(tcfg.init)
        self._keep_template()
        from .chat import load_pairs, load_sft
        eos = eos_id(self.tokenizer, self.template)
        train_path, val_path = data_files(tcfg)
        load = load_sft if tcfg.task == "sft" else load_pairs
        args = (self.template, self.tokenizer, tcfg.seq_len, tcfg.max_bad_fraction, eos)
        train = load(train_path, *args)
        val = load(val_path, *args) if val_path else None
        if val is None:   # the file's tail, as --corpus FILE.jsonl splits
            cut = len(train) - int(len(train) * tcfg.val_fraction)
            train, val = train[:max(cut, 1)], train[max(cut, 1):]
        self.train, self.val = train, val
        self.cfg = cfg
        D.check_vocab(D.TokenStream(np.concatenate([_ids(x) for x in train]), np.zeros(1)),
                      cfg.vocab_size, f"--data {tcfg.data}")
        write_run_file(tcfg.run_dir, cfg, tok_spec, train=tcfg.to_dict(),
                       corpus={"name": tcfg.data, "train_examples": len(train),
                               "val_examples": len(val)}, **run_file_extra)
        log(f"--data {tcfg.data}: {len(train)} training and {len(val)} held-out "
            f"{'pairs' if tcfg.task == 'dpo' else 'examples'}")

    def _keep_template(self):
        """Copy the base's chat template (and its bos/eos tokens) into the run: a run
        serves and fine-tunes further with the template it was trained on."""
        from jaxlm.model.io.chat import save_template
        if os.path.abspath(self.tcfg.run_dir) != os.path.abspath(self.tcfg.init):
            save_template(self.template, self.tcfg.run_dir)

    # ---------------------------------------------------------------------------------
    def setup(self, model: SplitModel, state, mesh=None):
        """(objective, batch iterator, evaluate(state) → {"val_loss", ...}, tokens per
        step), with `state` still holding the starting weights (before any restore)."""
        if self.tcfg.task == "sft":
            return self._sft(model, mesh)
        return self._dpo(model, state)

    def _sft(self, model, mesh):
        from .chat import pack
        tcfg = self.tcfg
        rows = pack(self.train, tcfg.seq_len)
        ds = (grain.MapDataset.source(_Rows(rows)).shuffle(seed=tcfg.seed).repeat(None)
              .batch(tcfg.batch_size * tcfg.grad_accum, drop_remainder=True)
              .map(D._stack(tcfg.grad_accum)))
        val = _row_batches(pack(self.val, tcfg.seq_len), tcfg.batch_size) if self.val else []
        eval_step = make_eval_step(model, mesh, tcfg.sequence_order)

        def evaluate(state):
            if not val:
                return {}
            from .loop import evaluate as mean_ce
            return {"val_loss": mean_ce(eval_step, state, val)}
        self.log(f"packed {len(self.train)} examples into {len(rows['inputs'])} rows of "
                 f"{tcfg.seq_len} positions")
        return (NEXT_TOKEN, iter(ds.to_iter_dataset()), evaluate,
                tcfg.seq_len * tcfg.batch_size * tcfg.grad_accum)

    def _dpo(self, model, state):
        tcfg = self.tcfg
        t = PR.pair_length(self.train + self.val, tcfg.seq_len)
        train, val = PR.pair_set(self.train, t), PR.pair_set(self.val, t)
        ref_model, ref_weights = None, None
        free = tcfg.loss in REFERENCE_FREE
        if not free and tcfg.reference == "precomputed":
            base = model.merge(state.params, state.rest, adapters=model.frozen is None)
            # the evaluation's batch shape: the step-0 rewards are then exactly 0
            PR.attach_reference(tcfg.run_dir, base, {"train": train, "val": val},
                                tcfg.batch_size, self.log)
        elif not free and tcfg.reference == "copy":
            # the starting weights, copied: the state's own are donated to the first step
            ref_model = model
            ref_weights = (jax.tree.map(jnp.copy, state.params),
                           jax.tree.map(jnp.copy, state.rest),
                           None if model.frozen is None else
                           jax.tree.map(jnp.copy, model.frozen))
        objective = PR.PreferenceObjective(tcfg, tcfg.reference, ref_model, ref_weights)
        batches = PR.pair_batches(train, tcfg.batch_size, tcfg.grad_accum, tcfg.seed)
        val_batches = PR.eval_batches(val, tcfg.batch_size) if len(val) else []
        eval_fn = PR.make_pair_eval(model, objective)

        def evaluate(state):
            if not val_batches:
                return {}
            m = PR.evaluate_pairs(eval_fn, state, val_batches)
            return {"val_loss": m.pop("loss"), **{f"val_{k}": v for k, v in m.items()}}
        return objective, batches, evaluate, 2 * t * tcfg.batch_size * tcfg.grad_accum


def _ids(x):
    return np.concatenate([x.chosen.tokens, x.rejected.tokens]) if hasattr(x, "chosen") \
        else x.tokens


class _Rows:
    """Packed SFT rows as a grain source."""

    def __init__(self, rows: dict):
        self.rows = rows

    def __len__(self):
        return len(self.rows["inputs"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def _row_batches(rows: dict, batch_size: int) -> list[dict]:
    """Held-out packed rows as [b, t] batches, the last padded with masked-out rows."""
    n = len(rows["inputs"])
    out = []
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, lo + batch_size) % n
        b = {k: v[idx] for k, v in rows.items()}
        b["loss_mask"] = b["loss_mask"] & (np.arange(lo, lo + batch_size) < n)[:, None]
        out.append(b)
    return out

