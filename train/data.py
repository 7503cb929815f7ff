"""Corpora → tokens → packed fixed-length sequences, through a checkpointable grain iterator.

    corpus = load_corpus("stdlib", val_fraction=0.05)        # documents, split by file
    tok, spec = make_tokenizer("bpe:1024", corpus.train, run_dir)
    train, val = token_streams(corpus, tok, seq_len=256, val_fraction=0.05)  # TokenStreams
    it = batches(train, seq_len=256, batch_size=16, accum=1, seed=0)
    batch = next(it); state = it.get_state()                 # {"next_index": n}: JSON
    held_out = val_batches(val, seq_len=256, batch_size=16, n_batches=4)

Documents are concatenated into one token stream and cut into windows of seq_len + 1
tokens (inputs = window[:-1], targets = window[1:]). Packing keeps documents apart:
each window carries segment ids (attention stays inside a document), positions that
restart at every document, and a loss mask that drops the one target per boundary
that would predict the next document's first token from the previous one.

The window order is a grain `MapDataset.shuffle(seed)`, reshuffled each epoch; the
iterator's state is one integer, saved in every checkpoint, so a resumed run reads
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import sysconfig
import zlib

import grain
import numpy as np

from jaxlm.model.io.tokenizer import ByteTokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class Corpus:
    name: str
    train: list[str] | np.ndarray     # documents, or a token array for .bin corpora
    val: list[str] | np.ndarray


@dataclasses.dataclass
class TokenStream:
    tokens: np.ndarray                # [n] uint8/16/32 (may be a np.memmap)
    doc_starts: np.ndarray            # [docs] int64 offsets, ascending, first is 0

    def __len__(self):
        return len(self.tokens)


# Corpora ---------------------------------------------------------------------------
def stdlib_files() -> list[str]:
    """The standard library's own .py files (no site-packages), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if not {"site-packages", "dist-packages"} & set(f.split(os.sep))]
    return sorted(files, key=lambda f: os.path.relpath(f, root))


def _held_out(name: str, val_fraction: float) -> bool:
    """A file's split from a hash of its name: stable under additions and reordering."""
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def docstrings(path: str) -> str | None:
    """The docstrings of a Python file's module, classes and functions, in source order,
    one paragraph each: English prose about code, a different text from the code itself
    (the `stdlib-docs` corpus, for fine-tuning a model trained on `stdlib`)."""
    source = _read_text(path)
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the stdlib's deliberately broken test files
        return None
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)),  # walk is breadth-first
                   key=lambda n: getattr(n, "lineno", 0))
    docs = [ast.get_docstring(node) for node in nodes]
    return "\n\n".join(d for d in docs if d) or None


def _split_files(files: list[str], root: str, val_fraction: float, read=None) -> Corpus:
    train, val = [], []
    for f in files:
        text = (read or _read_text)(f)
        if text:
            (val if _held_out(os.path.relpath(f, root), val_fraction) else train).append(text)
    return Corpus(root, train, val)


def _read_text(path: str) -> str | None:
    """A file's text, or None for binary or non-UTF-8 files (skipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _tail_split(items, val_fraction: float):
    cut = len(items) - int(len(items) * val_fraction)
    return items[:cut], items[cut:]


def load_corpus(spec: str, val_fraction: float = 0.05, jsonl_field: str = "text",
                bin_dtype: str = "uint16") -> Corpus:
    """'stdlib', 'stdlib-docs' (the stdlib's docstrings), a folder (every UTF-8 text file
    under it), a .jsonl (one JSON object per line), a .bin of tokens, or any other file as
    one text. Raises ValueError when the corpus is missing or unreadable."""
    if spec == "stdlib":
        files = stdlib_files()
        return _split_files(files, sysconfig.get_paths()["stdlib"], val_fraction)
    if spec == "stdlib-docs":
        return _split_files(stdlib_files(), sysconfig.get_paths()["stdlib"], val_fraction,
                            read=docstrings)
    if not os.path.exists(spec):
        raise ValueError(f"--corpus {spec!r}: no such file or folder (give a text file, a "
                         f"folder, a .jsonl, a .bin of tokens, 'stdlib' or 'stdlib-docs')")
    if os.path.isdir(spec):
        bins = [os.path.join(spec, f"{s}.bin") for s in ("train", "val")]
        if all(os.path.isfile(b) for b in bins):  # nanoGPT's layout: train.bin + val.bin
            return Corpus(spec, *(np.memmap(b, dtype=bin_dtype, mode="r") for b in bins))
        files = sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                       if os.path.isfile(f))
        return _split_files(files, spec, val_fraction)
    try:
        if spec.endswith(".bin"):
            tokens = np.memmap(spec, dtype=bin_dtype, mode="r")
            return Corpus(spec, *_tail_split(tokens, val_fraction))
        if spec.endswith(".jsonl"):
            return Corpus(spec, *_tail_split(_read_jsonl(spec, jsonl_field), val_fraction))
        text = _read_text(spec)
    except OSError as e:
        raise ValueError(f"--corpus {spec!r}: cannot be read ({e.strerror})") from None
    if text is None:
        raise ValueError(f"--corpus {spec!r}: not UTF-8 text (pre-tokenized corpora must "
                         f"end in .bin)")
    train, val = _tail_split(text, val_fraction)
    return Corpus(spec, [train], [val] if val else [])


def _read_jsonl(path: str, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--corpus {path!r} line {i}: not a JSON object with a "
                                 f"{field!r} string (set --jsonl_field)") from None
    return docs


# Tokenizers --------------------------------------------------------------------------
def make_tokenizer(spec: str, train_docs, run_dir: str, resume: bool = False):
    """'byte'; 'bpe:N' trains a byte-level BPE of N tokens on the training documents and
    saves RUN/tokenizer.json (a resumed run reloads that file); else a tokenizer.json path.
    Returns (tokenizer, the spec run.json records)."""
    if spec == "byte":
        return ByteTokenizer(), "byte"
    saved = os.path.join(run_dir, TOKENIZER_FILE)
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            size = 0
        if size <= 256:
            raise ValueError(f"--tokenizer {spec!r}: write bpe:N with N > 256 (the byte "
                             f"alphabet), e.g. bpe:4096")
        if not (resume and os.path.isfile(saved)):
            if isinstance(train_docs, np.ndarray):
                raise ValueError("--tokenizer bpe:N needs a text corpus; a .bin corpus is "
                                 "already tokenized (pass the tokenizer.json it was made with)")
            _train_bpe(train_docs, size, saved)
        return load_tokenizer(TOKENIZER_FILE, base_dir=run_dir), TOKENIZER_FILE
    if resume and os.path.isfile(saved):  # the run's own copy, even if the original moved
        return load_tokenizer(TOKENIZER_FILE, base_dir=run_dir), TOKENIZER_FILE
    tok = load_tokenizer(spec)
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{saved}.{os.getpid()}.tmp"
    with open(tok.path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read())  # the run keeps its own copy
    os.replace(tmp, saved)
    return load_tokenizer(TOKENIZER_FILE, base_dir=run_dir), TOKENIZER_FILE


def _train_bpe(docs: list[str], size: int, path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # processes of one run may share the folder
    tok.save(tmp)
    os.replace(tmp, path)


def token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def encode_docs(docs, tokenizer) -> TokenStream:
    """Documents (or an already tokenized array) → one stream with document offsets."""
    if isinstance(docs, np.ndarray):
        return TokenStream(docs, np.zeros(1, np.int64))
    dtype = token_dtype(tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        parts = [np.frombuffer(d.encode("utf-8"), np.uint8) for d in docs]
    else:
        parts = [np.asarray(e.ids, dtype) for e in tokenizer._tok.encode_batch(docs)]
    parts = [p for p in parts if len(p)]
    lengths = np.array([len(p) for p in parts], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return TokenStream(tokens, starts)


def check_vocab(stream: TokenStream, vocab_size: int, name: str) -> None:
    if len(stream) and int(stream.tokens.max()) >= vocab_size:
        raise ValueError(f"{name} holds token id {int(stream.tokens.max())} but the model's "
                         f"vocab_size is {vocab_size}; pass the matching --tokenizer or set "
                         f"--model.vocab_size")


# Packed windows ----------------------------------------------------------------------
class PackedWindows:
    """Random access to non-overlapping windows of seq_len + 1 tokens (a grain source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = max((len(stream) - 1) // seq_len, 0)

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        t = self.seq_len
        lo = int(i) * t
        window = np.asarray(self.stream.tokens[lo:lo + t + 1]).astype(np.int32)
        idx = np.arange(lo, lo + t + 1)
        doc = np.searchsorted(self.stream.doc_starts, idx, side="right") - 1
        doc_start = self.stream.doc_starts[doc[:-1]]
        return {"inputs": window[:-1], "targets": window[1:],
                "positions": (idx[:-1] - np.maximum(doc_start, lo)).astype(np.int32),
                "segment_ids": (doc[:-1] - doc[0]).astype(np.int32),
                "loss_mask": doc[1:] == doc[:-1]}


def _stack(accum: int):
    def stack(items):
        return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in items.items()}
    return stack


def train_dataset(stream: TokenStream, seq_len: int, batch_size: int, accum: int,
                  seed: int) -> grain.MapDataset:
    """Endless batches [accum, batch_size, seq_len] in a seeded order, new each epoch."""
    source = PackedWindows(stream, seq_len)
    return (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
            .batch(batch_size * accum, drop_remainder=True).map(_stack(accum)))


def batches(stream: TokenStream, seq_len: int, batch_size: int, accum: int, seed: int):
    """A grain iterator over train_dataset; get_state()/set_state() are JSON dicts."""
    return iter(train_dataset(stream, seq_len, batch_size, accum, seed).to_iter_dataset())


def val_batches(stream: TokenStream, seq_len: int, batch_size: int, n_batches: int):
    """The first n_batches batches [b, t] of validation windows, in order (fixed)."""
    source = PackedWindows(stream, seq_len)
    ds = grain.MapDataset.source(source).batch(batch_size, drop_remainder=False)
    return [ds[i] for i in range(min(n_batches, len(ds)))]


def token_streams(corpus: Corpus, tokenizer, seq_len: int, val_fraction: float):
    """(train, val) TokenStreams; refuses a corpus too small for one training window.

    When the held-out files give no full window (one file, few files), the validation
    split becomes the tail of the training stream instead."""
    train, val = encode_docs(corpus.train, tokenizer), encode_docs(corpus.val, tokenizer)
    need = seq_len + 1
    if val_fraction > 0 and len(val) < need:
        cut = len(train) - max(need, int(len(train) * val_fraction))
        if cut >= need:
            starts = train.doc_starts
            val = TokenStream(train.tokens[cut:], np.concatenate(
                [[0], starts[starts > cut] - cut]).astype(np.int64))
            train = TokenStream(train.tokens[:cut], starts[starts < cut])
    if len(train) < need:
        raise ValueError(f"--corpus {corpus.name!r} is too small: {len(train)} training "
                         f"tokens, but one sequence needs {need} (--seq_len {seq_len} + 1); "
                         f"give a larger corpus or a smaller --seq_len")
    return train, val
