"""What quantization costs on a trained model, on held-out standard-library text (files the
trainer held out): perplexity increase ≤ 1% for int8 weights, ≤ 5% for int4 in groups of
64 and ≤ 1% for the int8 KV cache; int8's greedy tokens agree with float's on ≥ 95% of
128 positions. The default run trains a smaller model briefly (~20 s); the `slow` run
checks the model the default training run (`python -m jaxlm.train`) produces, whose
figures the README records."""
import numpy as np
import pytest

from jaxlm.infer import Engine
from jaxlm.infer.quality import greedy_agreement, mean_nll
from jaxlm.model.io.runs import load_run
from jaxlm.model.quant import quantize
from jaxlm.train.config import TrainConfig, model_config
from jaxlm.train.data import encode_docs, load_corpus
from jaxlm.train.loop import train

# held-out windows (the trainer's val split by file), fixed positions
N_WINDOWS, WINDOW = 32, 193


def held_out(tokenizer, seed=0):
    val = encode_docs(load_corpus("stdlib").val, tokenizer).tokens
    starts = np.random.default_rng(seed).integers(0, len(val) - WINDOW, N_WINDOWS)
    return np.stack([np.asarray(val[s:s + WINDOW]) for s in starts]).astype(np.int32)


def trained(run_dir, steps, **model):
    tcfg = TrainConfig(steps=steps, seq_len=128, batch_size=16, warmup_steps=10,
                       eval_every=steps, checkpoint_every=steps, sample_tokens=0,
                       progress=False, plot=False, run_dir=str(run_dir))
    train(tcfg, model_config(tcfg, model), log=lambda *a, **k: None)
    lm, tokenizer, _ = load_run(str(run_dir))
    return lm, tokenizer


def check_quality(lm, tokenizer, report):
    windows = held_out(tokenizer)
    base = mean_nll(lm, windows)
    rise = {name: np.exp(mean_nll(m, windows, cache_dtype=c) - base) - 1 for name, m, c in (
        ("int8", quantize(lm, "int8"), None),
        ("int4_g64", quantize(lm, "int4", 64), None),
        ("kv_int8", lm, "int8"))}
    prompts = [w[:64].tolist() for w in windows[:8]]
    agree = greedy_agreement(Engine(lm, max_len=256), quantize(lm, "int8"), prompts, 128)
    report(f"ppl {np.exp(base):.3f}; increase int8 {100 * rise['int8']:+.3f}%, int4 g64 "
           f"{100 * rise['int4_g64']:+.3f}%, int8 cache {100 * rise['kv_int8']:+.3f}%; int8 "
           f"greedy agreement {agree}")
    assert rise["int8"] <= 0.01
    assert rise["int4_g64"] <= 0.05
    assert rise["kv_int8"] <= 0.01
    assert agree["free"] >= 0.95 and agree["teacher_forced"] >= 0.95
    # quantization does change the model (the checks above are not vacuous)
    assert abs(rise["int4_g64"]) > 1e-5


def test_quantized_quality_on_a_briefly_trained_model(tmp_path):
    lm, tokenizer = trained(tmp_path / "run", 120, d_model=128, n_layers=2, n_heads=2,
                            n_kv_heads=1, ffn_dim=384, remat="none")
    check_quality(lm, tokenizer, print)


@pytest.mark.slow
def test_quantized_quality_on_the_default_training_run(tmp_path):
    lm, tokenizer = trained(tmp_path / "run", 200)
    check_quality(lm, tokenizer, print)
