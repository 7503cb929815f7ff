"""Fine-tuning a released model: `--init PATH` (an HF directory or a jaxlm run) and
`--peft SPEC` (LoRA, prefix tuning or bottleneck adapters; jaxlm.model.peft).

A PEFT run trains the adapter alone. Its checkpoints hold the adapter (and its optimizer
state), never the base: run.json records where the base is and a content hash of it,
{"peft": spec, "base": {"path", "kind": "hf" | "run", "step", "sha256"}}, and resuming or
loading the run checks the base is still the one it was trained on. RUN/peft/ holds the
adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained` can use it on the transformers base.
"""
from __future__ import annotations

import os
import shutil
import sys

PEFT_DIR = "peft"
# What --model.FIELD may change on a base: how it computes, not what it is.
INIT_MAY_CHANGE = frozenset({"dtype"})


def save_adapter(lm, run_dir: str, base_path: str) -> str | None:
    """Write RUN/peft/ atomically (a temporary folder renamed into place); None with a
    one-line warning when the base has no Hugging Face form to point PEFT at."""
    from jaxlm.model.io.peft import save_peft
    target = os.path.join(run_dir, PEFT_DIR)
    tmp = f"{target}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_peft(lm, tmp, base_model_name_or_path=base_path)
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"warning: adapter not written in PEFT format: {e}", file=sys.stderr)
        return None
    old = f"{target}.{os.getpid()}.old"
    if os.path.isdir(target):
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target

