"""Tokenizers shared by training and inference: raw UTF-8 bytes, or a tokenizer.json.

Both expose vocab_size, encode(str) -> list[int], decode(list[int]) -> str and
`spec`, the string a run directory records to find the tokenizer again.
"""
from __future__ import annotations

import os


class ByteTokenizer:
    """256 ids, one per byte of the UTF-8 encoding; nothing to train or fetch."""
    vocab_size = 256
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (e.g. a byte-level BPE)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # optional heavy import
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist; pass a tokenizer.json path")
        self.path = path
        self.spec = "tokenizer.json"
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str, base_dir: str | None = None):
    """'byte', or a path to a tokenizer.json (relative paths resolve against base_dir)."""
    if spec == "byte":
        return ByteTokenizer()
    path = spec if base_dir is None or os.path.isabs(spec) else os.path.join(base_dir, spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return HFTokenizer(path)
