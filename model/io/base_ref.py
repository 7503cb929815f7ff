"""The base model an adapter was trained on: where it is and what it held.

A PEFT run's checkpoints hold the adapter, never the base; run.json records
{"path", "kind": "hf" | "run", "step", "sha256"} and loading or resuming the run checks
the base is still the one it was trained on (a content hash of its config and weights).
"""
from __future__ import annotations

import glob
import hashlib
import os


def base_kind(path: str) -> str:
    """'hf' (config.json + safetensors) or 'run' (a jaxlm trainer run), else a ValueError."""
    if os.path.isfile(os.path.join(path, "run.json")):
        return "run"
    if os.path.isfile(os.path.join(path, "config.json")) and glob.glob(
            os.path.join(path, "*.safetensors")):
        return "hf"
    raise ValueError(f"{path!r} is neither a Hugging Face model directory (config.json "
                     f"+ *.safetensors) nor a jaxlm run directory (run.json)")


def base_config(path: str, kind: str):
    """The base's Config, read from its config.json or run.json (no weights loaded)."""
    import json
    if kind == "hf":
        from .hf_config import config_from_hf
        with open(os.path.join(path, "config.json")) as f:
            return config_from_hf(json.load(f))
    from ..config import Config
    from .runs import read_run_file
    meta = read_run_file(path)
    if meta.get("peft") or meta.get("heads_only"):
        what = "an adapter" if meta.get("peft") else "a heads-only"
        raise ValueError(f"{path!r} is itself {what} run (its checkpoints hold no base "
                         f"weights); use its base as the base")
    return Config.from_dict(meta["model"])


def _files(path: str, kind: str, step: int | None) -> list[str]:
    if kind == "hf":
        return [os.path.join(path, "config.json"),
                *sorted(glob.glob(os.path.join(path, "*.safetensors")))]
    params = os.path.join(path, "checkpoints", str(step), "params")
    return [os.path.join(path, "run.json"),
            *sorted(f for f in glob.glob(os.path.join(params, "**", "*"), recursive=True)
                    if os.path.isfile(f))]


def content_hash(path: str, kind: str, step: int | None = None) -> str:
    """sha256 over the base's config and weight files (names relative to the base, then
    bytes), so a moved copy hashes the same and any changed weight does not."""
    h = hashlib.sha256()
    for f in _files(path, kind, step):
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_base(path: str, dtype: str | None = None, step: int | None = None, mesh=None,
              expect: str | None = None):
    """(CausalLM, base reference {"path", "kind", "step", "sha256"}) of an HF directory or a
    jaxlm run (its latest step unless `step`). expect: the sha256 the base must have (a
    resumed or reloaded adapter run), else a ValueError saying the base changed."""
    if expect is not None and not os.path.isdir(path):
        raise ValueError(f"the base model {path!r} this adapter was trained on is gone; "
                         f"put it back (or edit run.json's base.path to its new place)")
    kind = base_kind(path)
    path = os.path.abspath(path)
    if kind == "hf":
        from .hf import from_hf
        step = None
        digest = _checked(path, kind, step, expect)
        lm = from_hf(path, dtype=dtype, mesh=mesh)
    else:
        from .runs import latest_step, load_run
        base_config(path, kind)          # refuses an adapter run before loading anything
        step = latest_step(path) if step is None else step
        digest = _checked(path, kind, step, expect)
        lm, _, step = load_run(path, step=step, dtype=dtype, mesh=mesh)
    return lm, {"path": path, "kind": kind, "step": step, "sha256": digest}


def _checked(path, kind, step, expect) -> str:
    digest = content_hash(path, kind, step)
    if expect is not None and digest != expect:
        raise ValueError(f"the base model {path!r} changed since this adapter was trained "
                         f"on it (content hash differs); use the original base")
    return digest


def base_tokenizer(path: str, kind: str) -> str:
    """The trainer's --tokenizer for a base: 'byte' or the path of its tokenizer.json."""
    if kind == "hf":
        tok = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok):
            raise ValueError(f"{path!r} has no tokenizer.json; data for this base must be "
                             f"tokenized as the base was")
        return os.path.abspath(tok)
    import json
    with open(os.path.join(path, "run.json")) as f:
        spec = json.load(f)["tokenizer"]
    return spec if spec == "byte" else os.path.abspath(os.path.join(path, spec))
