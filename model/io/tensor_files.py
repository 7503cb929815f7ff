"""safetensors files in and out: a checkpoint directory's tensor names, dtypes and shapes
from the headers alone, each tensor's data read only when asked for; and the writer.

Both sides go through the `safetensors` library, so no pickle runs and no header is parsed
by hand. Its numpy framework maps BF16 to ml_dtypes.bfloat16 (the dtype jax itself uses)
both ways. Observed with safetensors 0.8: a BF16 tensor written by torch comes back from
safe_open(framework="numpy") as ml_dtypes.bfloat16, bit for bit, and
safetensors.numpy.save_file stores a bfloat16 array with dtype "BF16" — so bfloat16 needs
neither torch nor the jax/flax framework. FP8 it cannot give as numpy ("module 'numpy' has
no attribute 'float8_e4m3fn'"), hence READABLE.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

# safetensors' dtype spellings that numpy can hold → the numpy (ml_dtypes) name.
READABLE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of one file, known from the header; `read()` loads its data."""
    file: str
    name: str                      # as the file spells it
    dtype: str                     # as safetensors spells it: "BF16", "F32", ...
    shape: tuple[int, ...]
    handle: Any = dataclasses.field(repr=False, compare=False)  # the open safe_open

    @property
    def dtype_name(self) -> str | None:
        """The numpy name of the dtype, None when numpy cannot hold it."""
        return READABLE.get(self.dtype)

    def read(self) -> np.ndarray:
        return self.handle.get_tensor(self.name)


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory: those its index names, else all."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path!r} has no *.safetensors files (pickled pytorch_model.bin is "
                         f"not read; re-save with save_pretrained(safe_serialization=True))")
    return files


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_headers(path: str) -> dict[str, StoredTensor]:
    """Every tensor of the directory by name; only headers are read (files stay open,
    memory-mapped, until the tensors are dropped)."""
    tensors: dict[str, StoredTensor] = {}
    for file in checkpoint_files(path):
        handle = _open(file)
        for name in handle.keys():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in both {tensors[name].file} and {file}")
            view = handle.get_slice(name)
            tensors[name] = StoredTensor(file, name, view.get_dtype(),
                                         tuple(view.get_shape()), handle)
    return tensors


def write(tensors: Mapping[str, np.ndarray], file: str) -> None:
    """One safetensors file, marked as PyTorch layout as transformers expects."""
    safetensors.numpy.save_file({n: np.ascontiguousarray(t) for n, t in tensors.items()},
                                file, metadata={"format": "pt"})
