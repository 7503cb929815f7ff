"""Chat data for fine-tuning (train/chat.py) and the chat templates it shares with serving
(model/io/chat.py): rendering and masks against transformers, bad lines, packing."""
import json

import numpy as np
import pytest

from jaxlm.model.io.chat import DEFAULT_TEMPLATE, ChatTemplate, eos_id, load_template
from jaxlm.model.io.tokenizer import ByteTokenizer, HFTokenizer
from jaxlm.ops.attention import attention_mask
from jaxlm.train.chat import (Example, load_pairs, load_sft, pack, render_completion,
                              render_conversation)

# chatml with transformers' generation markers around exactly the span train/chat.py
# finds by incremental rendering: the assistant's content and its end of turn
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
          "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "how are you?"},
                {"role": "user", "content": "fine"},
                {"role": "assistant", "content": " the user is fine."}]
BYTE = ByteTokenizer()
DEFAULT = ChatTemplate()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A tiny byte-level BPE with chatml specials, as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("chatml")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["hello there, how are you?", "the assistant answers the user",
                             "system user assistant"] * 5, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _decode_mask(example, value=True):
    return BYTE.decode(example.tokens[example.mask == value])


# Templates ---------------------------------------------------------------------------
def test_moved_template_renders_as_transformers(chatml_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(chatml_dir))
    template = load_template(str(chatml_dir))
    for gen in (True, False):
        want = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert template.render(CONVERSATION, add_generation_prompt=gen) == want
    assert template.render(CONVERSATION).endswith("<|im_start|>assistant\n")  # serving's default
    from jaxlm.serve.chat import ChatTemplate as Served
    assert Served is ChatTemplate   # serving and training render with one class
    tok = HFTokenizer(str(chatml_dir / "tokenizer.json"))
    assert eos_id(tok, template) == tok._tok.token_to_id("<|im_end|>")
    assert eos_id(BYTE, template) is None and eos_id(tok, DEFAULT) is None


def test_run_directory_template(tmp_path):
    assert load_template(str(tmp_path)).source == DEFAULT_TEMPLATE   # a run without one
    (tmp_path / "chat_template.jinja").write_text(CHATML)             # a run that kept one
    assert load_template(str(tmp_path)).source == CHATML


# Masks -------------------------------------------------------------------------------
def test_masks_match_transformers_assistant_masks(chatml_dir):
    """Whole-text tokenization (transformers) and piece-by-piece (ours) agree here because
    every piece edge falls where the byte-level pre-tokenizer splits anyway: after the
    "\\n" that ends a role header (content starts with a letter or one space) and before
    an <|im_start|> special token. A content starting with "\\n" would merge with the
    header's newline in whole text; ours keeps the prompt's tokens as served."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(chatml_dir))
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    got = render_conversation(CONVERSATION, load_template(str(chatml_dir)),
                              HFTokenizer(str(chatml_dir / "tokenizer.json")))
    assert got.tokens.tolist() == want["input_ids"]
    assert got.mask.astype(int).tolist() == want["assistant_masks"]
    assert got.tokens.dtype == np.int32 and got.mask.dtype == bool


def test_default_template_masks_each_turn_and_its_end():
    e = render_conversation(CONVERSATION, DEFAULT, BYTE)
    assert BYTE.decode(e.tokens) == DEFAULT.render(CONVERSATION, add_generation_prompt=False)
    turns = [m["content"] + "\n" for m in CONVERSATION if m["role"] == "assistant"]
    assert _decode_mask(e) == "".join(turns)
    # the text before the first answer is the prompt exactly as served
    first = int(np.argmax(e.mask))
    assert BYTE.decode(e.tokens[:first]) == DEFAULT.render(CONVERSATION[:2])


def test_plain_and_conversational_completions():
    e = render_completion("2+2=", "4", DEFAULT, BYTE)
    assert BYTE.decode(e.tokens) == "2+2=4" and _decode_mask(e) == "4"
    e = render_completion("2+2=", "4", DEFAULT, BYTE, eos=0)
    assert e.tokens.tolist()[-1] == 0 and e.mask.tolist() == [False] * 4 + [True, True]
    # a few-shot assistant turn in the prompt is context, not a target
    prompt, answer = CONVERSATION[:4], [CONVERSATION[4]]
    e = render_completion(prompt, answer, DEFAULT, BYTE, eos=0)
    assert _decode_mask(e) == CONVERSATION[4]["content"] + "\n"
    assert _decode_mask(e, False) == DEFAULT.render(prompt)


def test_preference_pairs_mask_the_answers(tmp_path):
    convo = CONVERSATION[:4]
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"prompt": convo, "chosen": [good], "rejected": [bad]},
        {"chosen": convo + [good], "rejected": convo + [bad]}])
    pairs = load_pairs(path, DEFAULT, BYTE, seq_len=256, eos=7)
    assert [p.line for p in pairs] == [1, 2, 3] and pairs[0].chosen.line == 1
    assert _decode_mask(pairs[0].chosen) == " yes\x07"       # eos ends plain completions
    assert _decode_mask(pairs[0].rejected) == " no\x07"
    for p in pairs[1:]:
        assert _decode_mask(p.chosen) == "good\n" and _decode_mask(p.rejected) == "bad\n"
        prompt = DEFAULT.render(convo)
        assert _decode_mask(p.chosen, False) == _decode_mask(p.rejected, False) == prompt
    assert pairs[1].chosen.tokens.tolist() == pairs[2].chosen.tokens.tolist()


def test_sft_lines_of_every_format(tmp_path):
    path = _write(tmp_path / "s.jsonl", [
        {"messages": CONVERSATION}, "", {"prompt": "a", "completion": "b"},
        {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]], "extra": 1}])
    examples = load_sft(path, DEFAULT, BYTE, seq_len=256)
    assert [e.line for e in examples] == [1, 3, 4]
    assert [_decode_mask(e) for e in examples[1:]] == ["b", "how are you?\n"]


# Bad lines ---------------------------------------------------------------------------
USER = {"role": "user", "content": "x"}
ANSWER = {"role": "assistant", "content": "y"}
SFT_BAD = [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "x"}, r"missing field\(s\): give messages, or prompt and completion"),
    ({"prompt": "x"}, r"missing field\(s\) completion"),
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] must be an object with"),
    ({"messages": [{"role": "tool", "content": "x"}, ANSWER]}, "unknown role 'tool'"),
    ({"messages": [USER]}, "no assistant turn"),
    ({"prompt": "x", "completion": ""}, r"completion is empty after templating \(no target"),
    ({"prompt": "x", "completion": [ANSWER]}, "must both be strings or both message lists"),
    ({"prompt": [USER], "completion": [USER]}, "completion messages must be the assistant's"),
    ({"prompt": "x", "completion": "y" * 40}, r"41 tokens, longer than seq_len \+ 1 = 33"),
]
PAIRS_BAD = [
    ({"prompt": "x", "chosen": "a"}, r"missing field\(s\) rejected"),
    ({"chosen": "a", "rejected": "b"}, "without a prompt field"),
    ({"chosen": [USER, ANSWER], "rejected": [{"role": "user", "content": "z"}, ANSWER]},
     "different prompts"),
    ({"chosen": [USER, ANSWER], "rejected": [USER, ANSWER, USER, ANSWER]}, "different prompts"),
    ({"prompt": [USER], "chosen": [ANSWER], "rejected": [USER]}, "rejected messages must be"),
    ({"prompt": "x", "chosen": "a", "rejected": "b" * 40}, "rejected: 41 tokens, longer"),
]


@pytest.mark.parametrize("load,bad,reason", [(load_sft, *c) for c in SFT_BAD]
                         + [(load_pairs, *c) for c in PAIRS_BAD])
def test_bad_line_reasons(tmp_path, load, bad, reason):
    good = {"prompt": "x", "chosen": "a", "rejected": "b"} if load is load_pairs else \
        {"prompt": "x", "completion": "y"}
    path = _write(tmp_path / "d.jsonl", [good, "", bad])
    with pytest.raises(ValueError, match=rf"1 of 2 lines are unusable .*: line 3: .*{reason}"):
        load(path, DEFAULT, BYTE, seq_len=32)


def test_template_that_does_not_render_incrementally(tmp_path):
    # hides earlier answers (as templates that drop past reasoning do): turn 1's text
    # is not in the whole conversation's rendering
    source = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and "
              "not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    convo = [USER, ANSWER, USER, ANSWER]
    with pytest.raises(ValueError, match=r"does not render this conversation incrementally "
                                         r"\(turn 1\)"):
        render_conversation(convo, ChatTemplate(source), BYTE)
    assert render_conversation(convo[:2], ChatTemplate(source), BYTE).mask.any()


def test_bad_fraction_drops_or_refuses(tmp_path, capsys):
    lines = [{"prompt": "x", "completion": "y"}, "oops", {"prompt": "x", "completion": "z"},
             {"prompt": "x", "completion": "w"}]
    path = _write(tmp_path / "d.jsonl", lines)
    kept = load_sft(path, DEFAULT, BYTE, seq_len=32, max_bad_fraction=0.25)
    assert [e.line for e in kept] == [1, 3, 4]
    assert "1 of 4 lines are unusable and were skipped: line 2: not valid JSON" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=r"d.jsonl: 1 of 4 lines are unusable \(more than "
                                         r"--max_bad_fraction 0.2\): line 2: not valid"):
        load_sft(path, DEFAULT, BYTE, seq_len=32, max_bad_fraction=0.2)
    path = _write(tmp_path / "many.jsonl", ["{}"] * 8 + lines)
    with pytest.raises(ValueError, match=r"9 of 12 .*line 5: missing.*; and 4 more$"):
        load_sft(path, DEFAULT, BYTE, seq_len=32)


def test_empty_or_missing_files(tmp_path):
    for lines in ([], ["", "  "]):
        with pytest.raises(ValueError, match="holds no usable examples"):
            load_sft(_write(tmp_path / "e.jsonl", lines), DEFAULT, BYTE, seq_len=32)
    with pytest.raises(ValueError, match="holds no usable examples"):   # all bad, allowed
        load_pairs(_write(tmp_path / "b.jsonl", ["{}"]), DEFAULT, BYTE, 32, max_bad_fraction=1)
    with pytest.raises(ValueError, match="does not exist"):
        load_sft(str(tmp_path / "nope.jsonl"), DEFAULT, BYTE, seq_len=32)


# Packing -----------------------------------------------------------------------------
def _examples(lengths, seed=0):
    """Examples whose first token is their index, so a packed segment names its source."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, 256, n).astype(np.int32)
        tokens[0] = i
        out.append(Example(tokens, rng.random(n) < 0.5, line=i + 1))
    return out


def test_pack_reconstructs_every_example():
    seq_len = 16
    examples = _examples(np.random.default_rng(1).integers(2, seq_len + 2, 40))
    rows = pack(examples, seq_len)
    assert set(rows) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
    assert all(v.shape == (len(rows["inputs"]), seq_len) for v in rows.values())
    assert rows["loss_mask"].dtype == bool and rows["inputs"].dtype == np.int32
    seen = []
    for r in range(len(rows["inputs"])):
        seg = rows["segment_ids"][r]
        assert not rows["loss_mask"][r][seg == 0].any()            # padding trains nothing
        assert (seg[:(seg > 0).sum()] > 0).all()                     # padding only at the end
        for s in np.unique(seg[seg > 0]):
            at = seg == s
            e = examples[rows["inputs"][r][at][0]]
            seen.append(e.line)
            assert rows["inputs"][r][at].tolist() == e.tokens[:-1].tolist()
            assert rows["targets"][r][at].tolist() == e.tokens[1:].tolist()
            assert rows["loss_mask"][r][at].tolist() == e.mask[1:].tolist()
            assert rows["positions"][r][at].tolist() == list(range(len(e.tokens) - 1))
    assert sorted(seen) == list(range(1, 41))
    again = pack(examples, seq_len)
    assert all((again[k] == rows[k]).all() for k in rows)


def test_pack_is_first_fit_decreasing():
    # positions 5, 3, 3, 2, 2, 1 into rows of 8: [5, 3] then [3, 2, 2, 1]
    rows = pack(_examples([3, 6, 4, 2, 4, 3]), 8)
    assert rows["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 3 + [2] * 2 + [3] * 2 + [4]]
    assert rows["inputs"][:, 0].tolist() == [1, 4] and rows["inputs"][1, 3] == 0
    with pytest.raises(ValueError, match="line 1 has 10 tokens"):
        pack(_examples([10]), 8)


def test_packed_rows_attend_within_each_example():
    """The segment convention as ops/attention.py reads it: in a packed row a token sees
    the tokens of its own example up to itself, and padding (segment 0, positions
    counted like an example's) sees only padding."""
    rows = pack(_examples([5, 3, 4]), 12)
    seg, pos = rows["segment_ids"], rows["positions"]
    assert seg.tolist() == [[1] * 4 + [2] * 3 + [3] * 2 + [0] * 3]
    got = np.asarray(attention_mask(pos, pos, causal=True, q_segment_ids=seg,
                                    kv_segment_ids=seg))[0]
    i, j = np.indices(got.shape)
    np.testing.assert_array_equal(got, (seg[0][i] == seg[0][j]) & (j <= i))
