"""The embedded stdlib-sft / stdlib-dpo sets (train/examples.py): deterministic, split by
file, big enough, within the byte limits, and every DPO pair obeys the quote-style rule."""
import ast
import json
import textwrap

import pytest

from jaxlm.train import examples as E
from jaxlm.train.data import _held_out

SWAP = str.maketrans("'\"", "\"'")


@pytest.fixture(scope="module")
def sets():
    return {name: {s: make(s) for s in E.SPLITS} for name, make in E.EMBEDDED.items()}


def test_deterministic_and_fresh(sets):
    again = E.instruction_set("train")
    assert again == sets["stdlib-sft"]["train"]
    again[0]["messages"][0]["content"] = "changed"      # callers own their rows
    assert E.instruction_set("train") == sets["stdlib-sft"]["train"]
    E._instruction_records.cache_clear()
    E._preference_records.cache_clear()
    assert E.instruction_set("val") == sets["stdlib-sft"]["val"]
    assert E.preference_set("val") == sets["stdlib-dpo"]["val"]


@pytest.mark.parametrize("records", [E._instruction_records, E._preference_records])
def test_split_by_file(records):
    paths = {s: {r[0] for r in records()[s]} for s in E.SPLITS}
    assert not paths["train"] & paths["val"]
    for split, files in paths.items():
        assert all(_held_out(p, E.VAL_FRACTION) == (split == "val") for p in files)
        assert not any(E._is_test(p) for p in files)


def test_sizes(sets):
    assert len(sets["stdlib-sft"]["train"]) >= 1000 and len(sets["stdlib-sft"]["val"]) >= 100
    assert len(sets["stdlib-dpo"]["train"]) >= 400 and len(sets["stdlib-dpo"]["val"]) >= 100


def test_sft_rows(sets):
    for split in E.SPLITS:
        seen = set()
        for row in sets["stdlib-sft"][split]:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            text = user["content"] + assistant["content"]
            assert text.isascii() and len(text.encode()) <= E.SFT_MAX_BYTES
            ast.parse(assistant["content"] + " pass")     # a whole one-line def header
            assert assistant["content"].split()[0] in ("def", "async")
            assert (user["content"], assistant["content"]) not in seen
            seen.add((user["content"], assistant["content"]))


def test_dpo_rule(sets):
    for split in E.SPLITS:
        rows = sets["stdlib-dpo"][split]
        for i, row in enumerate(rows):
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            assert all(t.isascii() for t in row.values())
            assert len((prompt + chosen).encode()) <= E.DPO_MAX_BYTES
            assert len((prompt + rejected).encode()) <= E.DPO_MAX_BYTES
            assert len(chosen.encode()) <= E.COMPLETION_MAX_BYTES
            style, other = ('"', "'") if i % 2 == 0 else ("'", '"')  # balanced
            assert style in prompt and other not in prompt
            assert style in chosen and other not in chosen
            assert chosen.translate(SWAP) == rejected               # only the quotes differ
            assert prompt.endswith("\n") and chosen.endswith("\n") and chosen.count("\n") == 1


def test_pair_rules_on_a_known_file(tmp_path):
    src = textwrap.dedent('''\
        def f(x):
            """Docstring: never part of a pair."""
            a = 'one'
            b = "it's"          # a quote inside a literal: this line is unusable
            c = x['k']
            return c

        def g(y):
            d = y.get('a', 'b')  # don't: an apostrophe in a comment
            e = y.get('c')
            return rb'f' + 'g' f'h'
        ''')
    path = tmp_path / "m.py"
    path.write_text(src)
    fns = {fn.header: fn for fn in E._file_functions(str(path), "m.py")}
    assert fns["def f(x):"].summary == "Docstring: never part of a pair."
    assert fns["def f(x):"].pair is None   # a and c are cut apart by b's line
    assert fns["def g(y):"].pair is None   # a comment's apostrophe; 'g' f'h' is one literal


def test_pair_window_and_restyle(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("class C:\n    def h(self, s='x'):\n"
                    "        t = s\n        return f'{t}' + b'y'\n")
    (fn,) = E._file_functions(str(path), "m.py")
    prompt, completion, spans = fn.pair
    assert prompt == ("def h(self, s='x'):", "    t = s")
    assert completion == "    return f'{t}' + b'y'"
    assert E._restyle(completion, spans[-1], '"') == '    return f"{t}" + b"y"'


def test_bad_split_and_write_jsonl(tmp_path, sets):
    with pytest.raises(ValueError, match="split"):
        E.preference_set("test")
    out = tmp_path / "dpo.jsonl"
    E.write_jsonl(sets["stdlib-dpo"]["val"], str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == sets["stdlib-dpo"]["val"]
