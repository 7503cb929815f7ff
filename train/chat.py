"""Chat data for fine-tuning: JSONL lines → token ids with loss masks → packed rows.

    template = load_template(init_dir)                  # jaxlm.model.io.chat
    examples = load_sft("chats.jsonl", template, tok, seq_len=1024, eos=eos_id(tok, template))
    rows = pack(examples, seq_len=1024)                 # the trainer's packed batches
    pairs = load_pairs("prefs.jsonl", template, tok, seq_len=1024)

Lines (the formats TRL reads):
  SFT         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              {"prompt": str, "completion": str}
              {"prompt": [messages], "completion": [assistant messages]}
  preference  {"prompt": ..., "chosen": ..., "rejected": ...}, all strings or all message
              lists (chosen/rejected holding the assistant turns); or, without "prompt",
              chosen/rejected whole conversations equal up to their last assistant turn.

Loss masks cover what the model should learn to write: every assistant turn of a
conversation (its content and the end-of-turn text the template puts after it, so the
model learns to stop), only the completion's turns of a prompt/completion line, the
completion (and eos) of a plain line. Assistant turns are found by rendering the
conversation incrementally (see `_assistant_spans`), which needs no `{% generation %}`
markers in the template; it agrees with transformers' return_assistant_tokens_mask on a
template that has them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from jaxlm.model.io.chat import ChatTemplate, encode_prompt

ROLES = ("system", "user", "assistant")
SHOWN = 5   # bad lines quoted in a refusal or warning


@dataclasses.dataclass
class Example:
    """One training sequence: tokens [n] int32, mask [n] bool (True on loss targets)."""
    tokens: np.ndarray
    mask: np.ndarray
    line: int = 0   # 1-based JSONL line; 0 when not read from a file


@dataclasses.dataclass
class Pair:
    """One preference pair; both sequences start with the same prompt tokens."""
    chosen: Example
    rejected: Example
    line: int = 0


# Reading -----------------------------------------------------------------------------
def read_jsonl(path: str) -> list[tuple[int, dict | ValueError]]:
    """(line number, object) per non-blank line; a line that is not a JSON object comes
    back as a ValueError saying why, for load_* to count among the bad lines."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass a .jsonl file, one example per line")
    with open(path, "rb") as f:
        return [(n, _parse(raw)) for n, raw in enumerate(f, 1) if raw.strip()]


def _parse(raw: bytes) -> dict | ValueError:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return ValueError("not UTF-8 text")
    except json.JSONDecodeError as e:
        return ValueError(f"not valid JSON ({e.msg}, column {e.colno})")
    if not isinstance(obj, dict):
        return ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _check_messages(messages, name: str, allow_empty: bool = False) -> None:
    if not isinstance(messages, list) or not (messages or allow_empty):
        raise ValueError(f"{name} must be a non-empty list of {{role, content}} objects, "
                         f"got {_kind(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{name}[{i}] must be an object with string role and content")
        if m["role"] not in ROLES:
            raise ValueError(f"{name}[{i}] has unknown role {m['role']!r}; use system, user "
                             f"or assistant")


def _kind(x) -> str:
    return f"an empty {type(x).__name__}" if x in ([], "") else type(x).__name__


def _require(row: dict, *fields: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")


# Rendering ---------------------------------------------------------------------------
def _assistant_spans(messages, template: ChatTemplate, first: int = 0):
    """(F, spans): F, the whole conversation rendered, and the [start, end) characters of
    each assistant turn from message `first` on. Turn i spans from the end of P_i (the
    messages before it rendered as a prompt, with the generation prompt) to the end of
    E_i (the messages up to it rendered as finished); both must be prefixes of F, or
    the turn's text cannot be located in F."""
    full = template.render(messages, add_generation_prompt=False)
    spans = []
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(f"the chat template does not render this conversation "
                             f"incrementally (turn {i}); the assistant's tokens cannot be "
                             f"located, so use a template whose rendering of a conversation "
                             f"extends that of each of its prefixes")
        start = max(len(prompt), spans[-1][1] if spans else 0)
        spans.append((start, len(upto)))
    return full, spans


def _tokenize(text: str, spans, tokenizer) -> Example:
    """Ids of text, piece by piece between span edges, and True on the spans' tokens.
    Each piece is encoded alone, without special tokens (the template wrote any BOS), so
    the text before a turn, which is P_i, tokenizes exactly as the server tokenizes that
    prompt at inference; whole-text tokenization could merge a token across the edge."""
    pieces, at = [], 0
    for start, end in spans:
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    pieces.append((text[at:], False))
    ids, mask = [], []
    for piece, target in pieces:
        piece_ids = encode_prompt(tokenizer, piece) if piece else []
        ids += piece_ids
        mask += [target] * len(piece_ids)
    return _example(ids, mask)


def _example(ids, mask) -> Example:
    # the first token is never a target: nothing before it predicts it
    if not any(mask[1:]):
        raise ValueError("the completion is empty after templating (no target token); "
                         "give it text or drop the line")
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _last_assistant(messages, name: str) -> int:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{name} has no assistant turn, so nothing to train on; add one")
    return turns[-1]


def render_conversation(messages, template: ChatTemplate, tokenizer) -> Example:
    """A whole conversation; the loss covers every assistant turn."""
    _check_messages(messages, "messages")
    _last_assistant(messages, "messages")
    return _tokenize(*_assistant_spans(messages, template), tokenizer)


def render_completion(prompt, completion, template: ChatTemplate, tokenizer, eos=None,
                      name: str = "completion") -> Example:
    """A prompt and its completion, the loss on the completion. Strings are plain text,
    not templated: the prompt encoded as /v1/completions encodes it (tokenizer.encode,
    with the tokenizer's own special tokens, as TRL does too), then the completion and
    `eos` if given. Message lists are rendered with the template, the loss on the
    completion's assistant turns (which end with the template's own end of turn, so eos
    is not added)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        ids = list(tokenizer.encode(prompt))
        answer = encode_prompt(tokenizer, completion) + ([int(eos)] if eos is not None else [])
        return _example(ids + answer, [False] * len(ids) + [True] * len(answer))
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ValueError(f"prompt and {name} must both be strings or both message lists, "
                         f"got {type(prompt).__name__} and {type(completion).__name__}")
    _check_messages(prompt, "prompt", allow_empty=True)
    _check_messages(completion, name)
    for i, m in enumerate(completion):
        if m["role"] != "assistant":
            raise ValueError(f"{name}[{i}] has role {m['role']!r}; {name} messages must be "
                             f"the assistant's")
    full, spans = _assistant_spans(prompt + completion, template, first=len(prompt))
    return _tokenize(full, spans, tokenizer)


def _implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of two whole conversations that agree up to their
    last assistant turn."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError("without a prompt field, chosen and rejected must be whole "
                         "conversations (message lists); add a prompt field")
    _check_messages(chosen, "chosen")
    _check_messages(rejected, "rejected")
    c, r = _last_assistant(chosen, "chosen"), _last_assistant(rejected, "rejected")
    if c != r or chosen[:c] != rejected[:r]:
        raise ValueError("chosen and rejected have different prompts: their messages "
                         "before the last assistant turn differ; make them equal or give "
                         "a prompt field")
    return chosen[:c], chosen[c:], rejected[r:]


def render_pair(row: dict, template: ChatTemplate, tokenizer, eos=None) -> Pair:
    """A preference line → a Pair sharing the prompt."""
    _require(row, "chosen", "rejected")
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = _implicit_prompt(row["chosen"], row["rejected"])
    return Pair(render_completion(prompt, chosen, template, tokenizer, eos, "chosen"),
                render_completion(prompt, rejected, template, tokenizer, eos, "rejected"))


def render_sft(row: dict, template: ChatTemplate, tokenizer, eos=None) -> Example:
    """An SFT line → an Example."""
    if "messages" in row:
        return render_conversation(row["messages"], template, tokenizer)
    if "prompt" not in row and "completion" not in row:
        raise ValueError("missing field(s): give messages, or prompt and completion")
    _require(row, "prompt", "completion")
    return render_completion(row["prompt"], row["completion"], template, tokenizer, eos)


# Loading -----------------------------------------------------------------------------
def _fit(example: Example, seq_len: int, name: str = "") -> None:
    n = len(example.tokens)
    if n > seq_len + 1:   # n tokens give n - 1 training positions
        raise ValueError(f"{name}{n} tokens, longer than seq_len + 1 = {seq_len + 1}; "
                         f"raise --seq_len or shorten the example")


def load_sft(path: str, template: ChatTemplate, tokenizer, seq_len: int,
             max_bad_fraction: float = 0.0, eos=None) -> list[Example]:
    """The usable Examples of an SFT .jsonl (see _load for bad lines)."""
    def convert(row, line):
        example = render_sft(row, template, tokenizer, eos)
        _fit(example, seq_len)
        example.line = line
        return example
    return _load(path, convert, max_bad_fraction)


def load_pairs(path: str, template: ChatTemplate, tokenizer, seq_len: int,
               max_bad_fraction: float = 0.0, eos=None) -> list[Pair]:
    """The usable Pairs of a preference .jsonl (see _load for bad lines)."""
    def convert(row, line):
        pair = render_pair(row, template, tokenizer, eos)
        _fit(pair.chosen, seq_len, "chosen: ")
        _fit(pair.rejected, seq_len, "rejected: ")
        pair.line = pair.chosen.line = pair.rejected.line = line
        return pair
    return _load(path, convert, max_bad_fraction)


def _load(path: str, convert, max_bad_fraction: float) -> list:
    """convert(row, line) over a file's lines. Bad lines (convert's ValueErrors) are
    dropped with one warning while they are at most max_bad_fraction of the lines;
    beyond it the whole file is refused, naming them, since a format mistake would
    otherwise silently train on a sliver of the data."""
    items, bad = [], []
    rows = read_jsonl(path)
    for line, row in rows:
        try:
            if isinstance(row, ValueError):
                raise row
            items.append(convert(row, line))
        except ValueError as e:
            bad.append(f"line {line}: {e}")
    if len(bad) > max_bad_fraction * len(rows):
        raise ValueError(f"{path}: {len(bad)} of {len(rows)} lines are unusable (more than "
                         f"--max_bad_fraction {max_bad_fraction}): {_listing(bad)}")
    if not items:
        raise ValueError(f"{path} holds no usable examples; write one JSON object per line")
    if bad:
        print(f"warning: {path}: {len(bad)} of {len(rows)} lines are unusable and were "
              f"skipped: {_listing(bad)}", file=sys.stderr, flush=True)
    return items


def _listing(bad: list[str]) -> str:
    more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return "; ".join(bad[:SHOWN]) + more


# Packing -----------------------------------------------------------------------------
def pack(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Whole examples packed first-fit-decreasing into rows of seq_len training positions
    (an example of n tokens fills n - 1: inputs tokens[:-1], targets tokens[1:],
    loss_mask mask[1:]). The keys and their meaning are those of the trainer's packed
    pretraining windows (train/data.py PackedWindows), [rows, seq_len] each: positions
    restart at 0 per example; segment_ids are 1, 2, ... per example within a row and 0
    for the padding at a row's end, a segment of its own, since attention
    (ops/attention.py) lets a query see only keys of its segment id (and negative ids,
    prefix tuning's, so padding must not be negative); loss_mask is False on padding.
    Deterministic: equal lengths keep the examples' order."""
    sizes = [len(e.tokens) - 1 for e in examples]
    for e, n in zip(examples, sizes):
        if not 1 <= n <= seq_len:
            raise ValueError(f"the example from line {e.line} has {n + 1} tokens; packing "
                             f"needs 2 to seq_len + 1 = {seq_len + 1} (load_* refuses others)")
    rows = _first_fit(sizes, seq_len)
    out = {k: np.zeros((len(rows), seq_len), np.int32)
           for k in ("inputs", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((len(rows), seq_len), bool)
    for r, members in enumerate(rows):
        _fill(out, r, [examples[i] for i in members])
    return out


def _first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of sizes per row, each placed, longest first, in the first row with room.
    A max-tree over the rows' room finds that row in log time; rows not yet opened have
    all their room, so the leftmost row with room is a new one only when no open row
    fits."""
    leaves = 1 << max(len(sizes) - 1, 0).bit_length()
    room = [capacity] * (2 * leaves)   # room[k]: the most room in any row under node k
    rows: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = 1
        while k < leaves:
            k = 2 * k if room[2 * k] >= sizes[i] else 2 * k + 1
        if k - leaves == len(rows):
            rows.append([])
        rows[k - leaves].append(i)
        room[k] -= sizes[i]
        while k > 1:
            k //= 2
            room[k] = max(room[2 * k], room[2 * k + 1])
    return rows


def _fill(out: dict[str, np.ndarray], r: int, members: list[Example]) -> None:
    at = 0
    for segment, e in enumerate(members, 1):
        span = slice(at, at + len(e.tokens) - 1)
        out["inputs"][r, span] = e.tokens[:-1]
        out["targets"][r, span] = e.tokens[1:]
        out["positions"][r, span] = np.arange(len(e.tokens) - 1)
        out["segment_ids"][r, span] = segment
        out["loss_mask"][r, span] = e.mask[1:]
        at = span.stop
    # padding counts its own positions, a causal segment like the others
    out["positions"][r, at:] = np.arange(out["positions"].shape[1] - at)
