"""`python -m jaxlm.train --task sft|dpo` end to end on a tiny base run: SFT learns the
answers (loss on assistant tokens only) and keeps the chat template in the run; DPO with
LoRA and the adapter switched off as reference learns a preference the base does not have
(held-out reward accuracy ≥ 0.9) and logs TRL's metrics; a killed DPO run resumes bitwise
with its stored reference log-probs; bad data and bad flags are refused in one line that
names the line number or the fix."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.model.io.runs import load_run
from jaxlm.train.cli import main as train_main
from jaxlm.train.config import TrainConfig

TRAIN = ["--seq_len", "64", "--batch_size", "4", "--warmup_steps", "2", "--log_every", "1",
         "--sample_tokens", "0", "--progress", "false", "--plot", "false"]
BASE = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_dim", "64", "--steps", "4", "--lr", "3e-3",
        "--eval_every", "4", *TRAIN]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    os.environ["JAXLM_COMPILATION_CACHE"] = "0"   # in-process: leave jax's config alone
    tmp = tmp_path_factory.mktemp("posttrain")
    corpus = tmp / "code.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)))
    run = str(tmp / "base")
    assert train_main(BASE + ["--corpus", str(corpus), "--run_dir", run]) == 0
    yield run, tmp
    os.environ.pop("JAXLM_COMPILATION_CACHE")


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _quote_pairs(n, seed=0):
    """Answer with double quotes; the prompt shows either style half the time."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        q = '"' if i % 2 else "'"
        word = rng.choice(["spam", "eggs", "ham", "tea", "jam"])
        pairs.append({"prompt": f"a = {q}{i}{q}\nb = ", "chosen": f'"{word}"\n',
                      "rejected": f"'{word}'\n"})
    return pairs


def test_sft_then_lora_dpo(base, capsys):
    run, tmp = base
    rng = random.Random(0)
    chats = [{"messages": [{"role": "user", "content": f"double {a}"},
                           {"role": "assistant", "content": f"{2 * a}"}]}
             for a in (rng.randint(0, 49) for _ in range(120))]
    sft = str(tmp / "sft")
    assert train_main(["--task", "sft", "--init", run, "--data", _jsonl(tmp / "sft.jsonl", chats),
                       "--run_dir", sft, "--steps", "12", "--lr", "3e-3", "--eval_every", "12",
                       *TRAIN]) == 0
    out = capsys.readouterr().out
    base_val = float(out.split("base model's validation loss ")[1].split()[0])
    val = float(out.split("\nvalidation loss ")[1].split(",")[0])
    assert val < base_val - 0.5, (base_val, val)
    with open(os.path.join(sft, "tokenizer_config.json")) as f:
        assert "<|assistant|>" in json.load(f)["chat_template"]   # kept for serving

    # a base that copies the prompt's quote style sits near chance on these
    dpo = str(tmp / "dpo")
    assert train_main(["--task", "dpo", "--init", sft, "--data",
                       _jsonl(tmp / "dpo.jsonl", _quote_pairs(160)), "--val_fraction", "0.2",
                       "--peft", "lora:r=4,alpha=8,targets=q_proj,v_proj,o_proj",
                       "--reference", "adapter_off", "--run_dir", dpo, "--steps", "16",
                       "--lr", "2e-2", "--beta", "0.5", "--eval_every", "16", *TRAIN]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("reward accuracy ")[1].split(",")[0])
    assert acc >= 0.9, out
    rows = [r for r in _metrics(dpo) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)   # policy = reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert key in rows[-1], key
    assert os.path.isfile(os.path.join(dpo, "peft", "adapter_config.json"))


def _checkpoints(run):
    folder = os.path.join(run, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(
        folder) else []


def test_a_killed_dpo_run_resumes_bitwise_and_reads_its_reference_back(base):
    """SIGKILL mid-run, then --resume: the same weights and metrics as an uninterrupted
    run, with the precomputed reference log-probs read from the run, not recomputed."""
    run, tmp = base
    data = _jsonl(tmp / "resume_pairs.jsonl", _quote_pairs(64, seed=3))
    full, killed = str(tmp / "dpo_full"), str(tmp / "dpo_killed")
    common = ["-m", "jaxlm.train", "--task", "dpo", "--init", run, "--data", data,
              "--steps", "8", "--checkpoint_every", "2", "--eval_every", "8",
              "--lr", "1e-2", "--beta", "0.5", *TRAIN]
    # the later runs find the first one's programs in a cache of their own
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_COMPILATION_CACHE": "1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla")}

    def train(args, **extra):
        return subprocess.Popen([sys.executable, *common, *args], env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = train(["--run_dir", full])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    assert "reference log-probs of" in out   # computed once, before training

    victim = train(["--run_dir", killed], JAXLM_TRAIN_STEP_SLEEP="0.4")
    deadline = time.time() + 240
    while max(_checkpoints(killed), default=0) < 4:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 4 <= max(_checkpoints(killed)) < 8   # really mid-way

    resumed = train(["--run_dir", killed, "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming at step" in out and "reference log-probs of" not in out

    (a, _, sa), (b, _, sb) = load_run(full), load_run(killed)
    assert sa == sb == 8
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    keys = ("step", "loss", "rewards/margins", "rewards/accuracies", "logps/chosen")
    rows = [[tuple(r.get(k) for k in keys) for r in _metrics(d) if "loss" in r]
            for d in (full, killed)]
    assert rows[0] == rows[1] and len(rows[0]) == 8
    assert rows[0][-1][1] < np.log(2)   # it trained


def test_bad_data_is_refused_with_line_numbers(base, tmp_path, capsys):
    run, _ = base
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                            "content": "hello"}]}
    bad = [good, good, {"messages": [{"role": "user", "content": "no answer"}]}, good,
           {"prompt": "p"}]
    rc = train_main(["--task", "sft", "--init", run, "--data", _jsonl(tmp_path / "b.jsonl", bad),
                     "--run_dir", str(tmp_path / "r"), *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "line 3" in err and "line 5" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, says", [
    (["--task", "dpo", "--data", "x.jsonl"], "--init"),
    (["--task", "sft", "--init", "r"], "--data"),
    (["--task", "dpo", "--init", "r", "--data", "x", "--loss", "kto"], "one of dpo, ipo"),
    (["--task", "dpo", "--init", "r", "--data", "x", "--loss", "cdpo"], "--label_smoothing"),
    (["--task", "dpo", "--init", "r", "--data", "x", "--reference", "adapter_off"], "--peft"),
    (["--data", "x.jsonl"], "--task sft|dpo"),
])
def test_bad_flags_are_refused_in_one_line(argv, says):
    from jaxlm.train.config import parse_overrides
    with pytest.raises(ValueError, match=says.replace("|", r"\|")):
        TrainConfig(**parse_overrides(argv)[0])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_from_an_hf_directory_with_prefix_tuning_uses_its_template(tmp_path, capsys,
                                                                       monkeypatch):
    """--init an HF directory: its tokenizer.json and chat template (with an eos that ends
    plain completions) drive the data; prefix tuning trains; the run keeps the template."""
    monkeypatch.setenv("JAXLM_COMPILATION_CACHE", "0")   # in-process: leave jax's config
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = tmp_path / "hf"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["what is two plus two? four. three. five."] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128)).save_pretrained(hf)
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    rows = ([{"messages": [{"role": "user", "content": f"what is {a}?"},
                           {"role": "assistant", "content": b}]}
             for a, b in (("two plus two", "four"), ("one plus two", "three"))] * 20
            + [{"prompt": "two plus three is", "completion": " five."}] * 10)
    run = str(tmp_path / "run")
    assert train_main(["--task", "sft", "--init", str(hf), "--peft", "prefix:tokens=4",
                       "--data", _jsonl(tmp_path / "d.jsonl", rows), "--run_dir", run,
                       "--steps", "8", "--lr", "1e-2", "--eval_every", "8", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert float(out.split("\nvalidation loss ")[1].split(",")[0]) < float(
        out.split("base model's validation loss ")[1].split()[0])
    with open(os.path.join(run, "tokenizer_config.json")) as f:
        kept = json.load(f)
    assert kept["chat_template"] == CHATML and kept["eos_token"] == "<|im_end|>"
    assert os.path.isfile(os.path.join(run, "peft", "adapter_config.json"))
