"""Two embedded post-training sets made from the standard library, nothing downloaded:
`stdlib-sft` (instruction tuning) and `stdlib-dpo` (preference pairs), for the model that
`python -m jaxlm.train` pretrains on the same library's source (a byte-level model that
sees 128 bytes at a time).

    rows = instruction_set("train")   # [{"messages": [{"role": "user", ...}, {"role": ...}]}]
    pairs = preference_set("val")     # [{"prompt": ..., "chosen": ..., "rejected": ...}]
    write_jsonl(pairs, "/tmp/dpo_val.jsonl")

Both come from the library proper: every .py file of `stdlib_files()` that parses, minus
its test suites (test/, tests/, idle_test/ and test_*.py), whose tens of megabytes would
triple the build time for repetitive `def test_x(self):` examples. Files are split as the
pretraining corpus splits them (`_held_out(path, 0.05)`, a crc32 of the relative path),
so the "val" rows come from files the default run never trained on. A row is kept once:
duplicates inside a split, and held-out rows that also occur in "train", are dropped.

stdlib-sft: the user asks with a function's docstring summary (the first sentence of its
first paragraph, whitespace collapsed) and the assistant answers with the function's
`def` line as written (one-line headers only, indentation removed):

    user: "Return True if it is a block device."   assistant: "def isblk(self):"

User plus assistant content is at most 100 bytes, so a chat template's ~25 bytes still
fit a 128-byte context; ASCII only.

stdlib-dpo: "continue in the quote style of the code above". The prompt is a few whole
consecutive lines of a function (the most that fit before the completion, never crossing
the def line); the completion is the next line. Every string literal in the prompt and
the completion is a simple one-line literal with no quote character inside (so either
quote is legal and means the same), and no other quote character appears (no comments
with apostrophes, no docstrings). The prompt's literals are rewritten in one style,
double quotes for even-numbered pairs and single quotes for odd ones (balanced, fixed);
`chosen` writes the completion's literals in the prompt's style, `rejected` in the other.
The two completions differ only in their quote characters. prompt + completion is at
most 120 bytes (the completion at most 80); each function gives at most one pair (its
first line that qualifies within its first 20 lines).

Why this rule: the default run's base (200 steps, byte-level) prefers single quotes almost
everywhere (the library's majority style) and barely looks at the prompt's style, so it
picks the chosen side on most single-quoted pairs (0.81) and few double-quoted ones
(0.24): 0.52 of the 125 held-out pairs (0.51 of the 1731 train pairs), near chance by
construction. Two rejected alternatives: "always double quotes" on the same completions
(base 0.22, far from chance), and "a def's real next lines over the same lines with two
adjacent ones swapped" (base 0.47, but no simple rule: a scratch DPO run, 100 steps on 600
pairs, lifted it only to 0.77). Copying the style of the lines above is one consistent rule
a small model learns from a few hundred pairs: a scratch DPO run (60 steps on 600 train
pairs) preferred chosen on all 125 held-out pairs.

Built once per process (functools.lru_cache; a few seconds, mostly `ast.parse`); each call
returns fresh row objects, so callers may mutate them.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import sysconfig
from typing import NamedTuple

from .data import _held_out, _read_text, stdlib_files

VAL_FRACTION = 0.05         # the pretraining corpus's: held-out files stay held out
SFT_MAX_BYTES = 100         # user + assistant content
DPO_MAX_BYTES = 120         # prompt + completion
COMPLETION_MAX_BYTES = 80
SCAN_LINES = 20             # a function's first lines searched for a preference pair
SPLITS = ("train", "val")
TEST_DIRS = {"test", "tests", "idle_test"}

# A one-line literal with no quote inside: swapping its quotes keeps its meaning.
SIMPLE_LITERAL = re.compile(r"(?:[rRbBfFuU]|[rR][bBfF]|[bBfF][rR])?"
                            r"(?:'[^'\"\n]*'|\"[^'\"\n]*\")\Z")
SENTENCE = re.compile(r".+?[.!?](?=\s+[A-Z]|\Z)")  # ends before a capital, not at "e.g."


class Function(NamedTuple):
    """A function with a one-line def, as the two sets need it."""
    path: str                 # relative to the stdlib root
    lineno: int
    header: str               # the def line, indentation removed
    summary: str | None       # its docstring's first sentence
    pair: tuple | None        # (prompt lines, completion line, literal columns per line):
                              # its preference pair, dedented to the def (_first_pair)


# Parsing -------------------------------------------------------------------------------
def _is_test(path: str) -> bool:
    parts = path.split(os.sep)
    return bool(TEST_DIRS & set(parts[:-1])) or parts[-1].startswith("test_")


@functools.lru_cache(maxsize=1)
def _functions() -> tuple[Function, ...]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for path in stdlib_files():
        rel = os.path.relpath(path, root)
        if not _is_test(rel):
            found += _file_functions(path, rel)
    return tuple(found)


def _file_functions(path: str, rel: str) -> list[Function]:
    source = _read_text(path)
    if source is None:
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the stdlib's deliberately broken files
        return []
    lines = source.splitlines()
    found = []
    for fn in _function_defs(tree):
        header = lines[fn.lineno - 1]
        if _one_line_header(fn, header):
            doc = ast.get_docstring(fn)
            found.append(Function(rel, fn.lineno, header.strip(), doc and _summary(doc),
                                  _first_pair(fn, lines)))
    return found


def _function_defs(tree):
    """Every def, nested ones included, visiting statements only (not expressions)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                todo.append(child)


def _one_line_header(fn, line: str) -> bool:
    """`def name(args):` complete on its line, the body below it, no comment after it."""
    parts = [fn.args, fn.returns] if fn.returns else [fn.args]
    ends = [n.end_lineno for p in parts for n in ast.walk(p) if hasattr(n, "end_lineno")]
    return (line[:fn.col_offset].strip() == "" and line.rstrip().endswith(":")
            and "#" not in line and fn.body[0].lineno > fn.lineno
            and all(e == fn.lineno for e in ends))


def _literal_index(fn, first: int, last: int) -> dict[int, list]:
    """{0-based row in first..last: [(start, end) or None]}: the columns of each string
    literal of fn on one row, None on every row of a multi-line one. Only nodes that start
    by row `last` are visited (a node starts no earlier than its parent), which keeps this
    a small fraction of a whole-tree walk."""
    spans, todo = set(), list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if getattr(node, "lineno", 0) - 1 > last:
            continue
        if isinstance(node, ast.JoinedStr) or (  # whole f-strings, not their parts
                isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))):
            spans.add((node.lineno - 1, node.col_offset,
                       node.end_lineno - 1, node.end_col_offset))
        else:
            todo.extend(ast.iter_child_nodes(node))
    index: dict[int, list] = {}
    for row, start, end_row, end in sorted(spans):
        if end_row != row:
            for r in range(max(row, first), min(end_row, last) + 1):
                index.setdefault(r, []).append(None)
        else:
            index.setdefault(row, []).append((start, end))
    return index


def _clean(line: str, spans, col: int):
    """The simple literals' columns on this line (dedented by col), or None when any quote
    on it is something else: a comment, a docstring, a literal with a quote inside. ASCII
    lines only: ast's columns count bytes."""
    if not line.isascii() or None in spans:
        return None
    if any(not SIMPLE_LITERAL.match(line[s:e]) for s, e in spans):
        return None
    rest, prev = [], 0
    for s, e in spans:
        rest.append(line[prev:s])
        prev = e
    rest.append(line[prev:])
    if "'" in "".join(rest) or '"' in "".join(rest):
        return None
    return tuple((s - col, e - col) for s, e in spans)


def _summary(doc: str) -> str:
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = SENTENCE.match(paragraph)
    return sentence.group(0) if sentence else paragraph


def _split(split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'val'")
    return split == "val"


def _by_split(make) -> dict[str, list]:
    """make(function) -> (dedup key, record) or None, over train files then held-out ones;
    a key seen before (in this split, or in train) is dropped."""
    seen, out = set(), {}
    for split in SPLITS:
        out[split] = []
        for fn in _functions():
            if _held_out(fn.path, VAL_FRACTION) != (split == "val"):
                continue
            made = make(fn)
            if made and made[0] not in seen:
                seen.add(made[0])
                out[split].append(made[1])
    return out


# stdlib-sft ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _instruction_records() -> dict[str, list]:
    """{split: [(path, lineno, user, assistant)]}."""
    def make(fn):
        user, assistant = fn.summary, fn.header
        if not user or not user[0].isalpha() or not (user + assistant).isascii():
            return None
        if len(user) + len(assistant) > SFT_MAX_BYTES:
            return None
        return (user, assistant), (fn.path, fn.lineno, user, assistant)
    return _by_split(make)


def instruction_set(split: str = "train") -> list[dict]:
    """SFT rows: a docstring summary asks for its function's def line (module docstring)."""
    records = _instruction_records()["val" if _split(split) else "train"]
    return [{"messages": [{"role": "user", "content": user},
                          {"role": "assistant", "content": assistant}]}
            for _, _, user, assistant in records]


# stdlib-dpo ----------------------------------------------------------------------------
def _restyle(line: str, spans, quote: str) -> str:
    """line with each simple literal's two quotes written as `quote`."""
    out = list(line)
    for s, e in spans:
        out[line.index(line[e - 1], s)] = out[e - 1] = quote  # the opening one follows a prefix
    return "".join(out)


def _first_pair(fn, lines: list[str]):
    """(prompt lines, completion line, literal columns of each) for the first line of fn's
    first SCAN_LINES that can be a completion, under the most clean lines above it that fit
    (never above the def), all dedented to the def; or None."""
    col, first = fn.col_offset, fn.lineno - 1
    body = []
    for line in lines[first:min(fn.end_lineno, first + SCAN_LINES)]:
        if line.strip() and not line.startswith(" " * col):
            break  # a string's text outdented past the def: stop there
        body.append(line[col:])
    # Cheap and exact: a completion has a quote, fits, and has no triple quote (a line of
    # simple literals never does); only then are the literals located.
    hopeful = [k for k in range(1, len(body)) if len(body[k]) < COMPLETION_MAX_BYTES
               and ("'" in body[k] or '"' in body[k])
               and "'''" not in body[k] and '"""' not in body[k]]
    if not hopeful:
        return None
    spans = _literal_index(fn, first, first + hopeful[-1])
    info = [_clean(lines[first + i], spans.get(first + i, ()), col)
            for i in range(hopeful[-1] + 1)]
    for k in hopeful:
        if not info[k]:
            continue
        j, size = k, len(body[k]) + 1
        while j > 0 and info[j - 1] is not None and size + len(body[j - 1]) + 1 <= DPO_MAX_BYTES:
            j -= 1
            size += len(body[j]) + 1
        if any(info[j:k]):   # the prompt shows a style to follow
            return tuple(body[j:k]), body[k], tuple(info[j:k + 1])
    return None


@functools.lru_cache(maxsize=1)
def _preference_records() -> dict[str, list]:
    """{split: [(path, lineno, prompt lines, completion, literal columns)]}."""
    def make(fn):
        if fn.pair is None:
            return None
        prompt, completion, spans = fn.pair
        return (prompt, completion), (fn.path, fn.lineno, prompt, completion, spans)
    return _by_split(make)


def preference_set(split: str = "train") -> list[dict]:
    """DPO pairs: chosen continues in the prompt's quote style, rejected in the other one
    (module docstring)."""
    rows = []
    for i, (_, _, prompt, completion, spans) in enumerate(
            _preference_records()["val" if _split(split) else "train"]):
        style, other = ('"', "'") if i % 2 == 0 else ("'", '"')
        text = "".join(_restyle(line, s, style) + "\n" for line, s in zip(prompt, spans))
        rows.append({"prompt": text, "chosen": _restyle(completion, spans[-1], style) + "\n",
                     "rejected": _restyle(completion, spans[-1], other) + "\n"})
    return rows


EMBEDDED = {"stdlib-sft": instruction_set, "stdlib-dpo": preference_set}


def write_jsonl(rows, path: str) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
