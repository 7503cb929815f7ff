"""Corpora, tokenizers, packing and the checkpointable data order; the CLI convention."""
import json
import os

import numpy as np
import pytest

from jaxlm.model.io.tokenizer import ByteTokenizer
from jaxlm.train import data as D
from jaxlm.train.config import TrainConfig, parse_overrides


def _stream(docs):
    return D.encode_docs(docs, ByteTokenizer())


def test_packing_keeps_documents_apart():
    stream = _stream(["abcdef", "XYZ", "0123456789"])
    w = D.PackedWindows(stream, seq_len=8)
    assert len(w) == (19 - 1) // 8
    first = w[0]  # tokens 0..8: "abcdefXYZ"
    assert bytes(first["inputs"].astype(np.uint8)) == b"abcdefXY"
    assert bytes(first["targets"].astype(np.uint8)) == b"bcdefXYZ"
    np.testing.assert_array_equal(first["segment_ids"], [0, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 4, 5, 0, 1])
    # "f" → "X" crosses a document boundary: that one target does not count.
    np.testing.assert_array_equal(first["loss_mask"], [1, 1, 1, 1, 1, 0, 1, 1])
    second = w[1]  # tokens 8..16 start mid-document: positions count from the window
    np.testing.assert_array_equal(second["positions"][:2], [0, 0])
    np.testing.assert_array_equal(second["segment_ids"][:2], [0, 1])


def test_order_is_seeded_and_the_iterator_resumes_from_its_state():
    stream = _stream([bytes(range(32, 127)).decode() * 20])
    take = lambda it, n: [next(it)["inputs"].copy() for _ in range(n)]  # noqa: E731
    a = take(D.batches(stream, 16, 4, 2, seed=3), 6)
    b = take(D.batches(stream, 16, 4, 2, seed=3), 6)
    c = take(D.batches(stream, 16, 4, 2, seed=4), 6)
    assert a[0].shape == (2, 4, 16)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))
    it = D.batches(stream, 16, 4, 2, seed=3)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    resumed = D.batches(stream, 16, 4, 2, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 3)), np.stack(a[3:]))
    # Every window appears once per epoch.
    n = len(D.PackedWindows(stream, 16))
    seen = np.concatenate([x.reshape(-1, 16) for x in take(D.batches(stream, 16, 1, 1, 0), n)])
    assert len({row.tobytes() for row in seen}) == len({D.PackedWindows(stream, 16)[i][
        "inputs"].tobytes() for i in range(n)})


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    files = D.stdlib_files()
    assert files == D.stdlib_files() and len(files) > 100
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    held = [f for f in files if D._held_out(os.path.basename(f), 0.05)]
    assert 0 < len(held) < 0.2 * len(files)


def test_stdlib_docs_corpus_holds_each_files_docstrings(monkeypatch, tmp_path):
    """stdlib-docs: per file, the module's, classes' and functions' docstrings in source
    order (dedented as Python's inspect.cleandoc does), nothing of the code; a file without
    docstrings, or one Python cannot parse, gives no document."""
    import inspect
    docs = ["Module doc.", "Class doc.\n\n    Second paragraph.", "Method doc.",
            "Function doc."]
    (tmp_path / "a.py").write_text(
        f'"""{docs[0]}"""\nimport os\n\n\nclass C:\n    """{docs[1]}"""\n\n'
        f'    def m(self):\n        """{docs[2]}"""\n        return 1\n\n\n'
        f'async def f():\n    """{docs[3]}"""\n    x = "not a docstring"\n')
    (tmp_path / "b.py").write_text("x = 1\n")
    (tmp_path / "c.py").write_text('"""Doc."""\ndef broken(:\n')
    files = sorted(str(p) for p in tmp_path.glob("*.py"))
    monkeypatch.setattr(D, "stdlib_files", lambda: files)
    monkeypatch.setattr(D.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    corpus = D.load_corpus("stdlib-docs", val_fraction=0.0)
    assert corpus.train == ["\n\n".join(inspect.cleandoc(d) for d in docs)]
    assert corpus.val == [] and "not a docstring" not in corpus.train[0]


def test_text_folder_jsonl_and_bin_corpora(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("hello world " * 100)
    c = D.load_corpus(str(text), val_fraction=0.1)
    assert len(c.train[0]) == 1080 and len(c.val[0]) == 120

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        (folder / "sub" / f"f{i}.md").write_text(f"document {i} " * 10)
    (folder / "blob.bin.dat").write_bytes(b"\0\1\2" * 10)  # binary: skipped
    c = D.load_corpus(str(folder), val_fraction=0.25)
    assert len(c.train) + len(c.val) == 40 and c.val

    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(10)) + "\n")
    c = D.load_corpus(str(jl), val_fraction=0.2, jsonl_field="body")
    assert c.train[0] == "row 0" and c.val == ["row 8", "row 9"]
    with pytest.raises(ValueError, match="jsonl_field"):
        D.load_corpus(str(jl), jsonl_field="text")

    tokens = np.arange(1000, dtype=np.uint32) * 70
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    c = D.load_corpus(str(tmp_path / "t.bin"), val_fraction=0.1, bin_dtype="uint32")
    assert isinstance(c.train, np.memmap) and len(c.train) == 900
    train, val = D.token_streams(c, ByteTokenizer(), 16, 0.1)
    np.testing.assert_array_equal(val.tokens, tokens[900:])
    with pytest.raises(ValueError, match="vocab_size"):
        D.check_vocab(train, 256, "the training split")


def test_small_or_missing_corpus_is_one_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ValueError, match="too small"):
        D.token_streams(D.load_corpus(str(tmp_path / "tiny.txt")), ByteTokenizer(), 64, 0.05)
    with pytest.raises(ValueError, match="no such file"):
        D.load_corpus(str(tmp_path / "missing"))


def test_validation_falls_back_to_the_tail_when_files_give_none(tmp_path):
    corpus = D.Corpus("x", ["a" * 500, "b" * 500], [])
    train, val = D.token_streams(corpus, ByteTokenizer(), 16, 0.1)
    assert len(train) + len(val) == 1000 and len(val) >= 17
    assert set(val.tokens.tolist()) == {ord("b")}


def test_bpe_tokenizer_is_trained_saved_and_reloaded(tmp_path):
    docs = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(200)]
    tok, spec = D.make_tokenizer("bpe:300", docs, str(tmp_path))
    assert spec == "tokenizer.json" and (tmp_path / "tokenizer.json").exists()
    assert tok.vocab_size == 300
    ids = tok.encode(docs[7])
    assert len(ids) < len(docs[7]) and tok.decode(ids) == docs[7]
    again, _ = D.make_tokenizer("bpe:300", None, str(tmp_path), resume=True)  # reloads
    assert again.encode(docs[7]) == ids
    other, _ = D.make_tokenizer(str(tmp_path / "tokenizer.json"), None, str(tmp_path / "r2"))
    assert other.encode(docs[7]) == ids
    with pytest.raises(ValueError, match="bpe:N"):
        D.make_tokenizer("bpe:100", docs, str(tmp_path))
    stream = D.encode_docs(docs, tok)
    assert stream.tokens.dtype == np.uint16 and len(stream.doc_starts) == 200


def test_command_line_convention():
    train, model = parse_overrides(["--steps", "7", "--lr=1e-3", "--resume",
                                    "--model.d_model", "64", "--model.dtype=bfloat16",
                                    "--model.rope_scaling", '{"kind": "linear", "factor": 2}',
                                    "--sample_prompt", "import", "--model.n_kv_heads", "none"])
    assert train == {"steps": 7, "lr": 1e-3, "resume": True, "sample_prompt": "import"}
    assert model == {"d_model": 64, "dtype": "bfloat16", "n_kv_heads": None,
                     "rope_scaling": {"kind": "linear", "factor": 2}}
    assert parse_overrides(["--warmup_steps", "0", "--lr", "1"])[0]["lr"] == 1.0
    for argv, msg in ((["--stepz", "3"], "did you mean --steps"),
                      (["--model.dmodel", "3"], "did you mean --model.d_model"),
                      (["--steps", "many"], "--steps: expected int"),
                      (["--steps"], "--steps needs a value"),
                      (["steps=3"], "unexpected argument")):
        with pytest.raises(ValueError, match=msg):
            parse_overrides(argv)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="gpt5")
