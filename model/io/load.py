"""One loader: any directory a model travels in → the model, its tokenizer, its stop ids.

    got = load("runs/tiny-…")            # a trainer run: full, adapter (LoRA/QLoRA/prefix/
                                          # bottleneck), heads-only or quantized
    got = load("~/models/Qwen3-0.6B")     # a Hugging Face model directory
    got = load("peft_dir")                # a PEFT adapter directory over a local base
    got.lm, got.tokenizer, got.stop_ids

python -m jaxlm.infer and python -m jaxlm.serve both load through it. With a mesh every
weight lands in its shards, adapters too (an adapter restored whole on one device beside a
sharded base cannot run: the engine refuses the mixed placement).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from ..sharding import state_shardings


@dataclasses.dataclass
class Loaded:
    lm: Any                  # CausalLM
    tokenizer: Any           # jaxlm.model.io.tokenizer's, or None (token ids only)
    stop_ids: list           # the HF config's eos_token_id(s); [] for runs
    kind: str                # "run", "hf" or "peft"
    step: int | None = None  # a run's checkpoint step


def kind_of(path: str) -> str:
    """'run', 'peft' or 'hf' for a directory, else a one-line ValueError."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; pass a jaxlm run, a Hugging Face "
                         f"model or a PEFT adapter directory")
    for name, kind in (("run.json", "run"), ("adapter_config.json", "peft"),
                       ("config.json", "hf")):
        if os.path.isfile(os.path.join(path, name)):
            return kind
    raise ValueError(f"{path!r} holds no run.json (a jaxlm run), adapter_config.json (a "
                     f"PEFT adapter) or config.json (a Hugging Face model)")


def load(path: str, *, step: int | None = None, dtype: str | None = None,
         mesh=None) -> Loaded:
    kind = kind_of(path)
    if kind == "run":
        from .runs import load_run
        lm, tokenizer, step = load_run(path, step=step, dtype=dtype, mesh=mesh)
        return Loaded(lm, tokenizer, [], "run", step)
    if kind == "peft":
        return _load_peft_dir(path, dtype, mesh)
    from .hf import from_hf
    from .tokenizer import HFTokenizer
    lm = from_hf(path, dtype=dtype, mesh=mesh)
    tok_path = os.path.join(path, "tokenizer.json")
    tokenizer = HFTokenizer(tok_path) if os.path.isfile(tok_path) else None
    with open(os.path.join(path, "config.json")) as f:
        eos = json.load(f).get("eos_token_id")
    stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return Loaded(lm, tokenizer, stops, "hf")


def _load_peft_dir(path: str, dtype, mesh) -> Loaded:
    """A PEFT adapter over the base its config names, which must be a local directory."""
    from .peft import load_peft, read_peft_config
    base_path = read_peft_config(path).get("base_model_name_or_path") or ""
    if not os.path.isdir(base_path) or kind_of(base_path) == "peft":
        raise ValueError(f"the PEFT adapter {path!r} names its base {base_path!r}, which is "
                         f"not a local model directory; load the base and pass the adapter "
                         f"with --adapter")
    base = load(base_path, dtype=dtype, mesh=mesh)
    lm = load_peft(base.lm, path)
    if mesh is not None:   # the adapter's new variables into their shards too
        state = nnx.state(lm)
        nnx.update(lm, jax.device_put(state, state_shardings(state, mesh)))
    return Loaded(lm, base.tokenizer, base.stop_ids, "peft")
