"""KV-cache planner figures against hand-computed products, and against real cache arrays."""
import pytest

from jaxlm.model import Config, abstract_model, preset
from jaxlm.model.memory import kv_bytes_per_token, main, plan


def test_llama3_70b_mha_vs_gqa_fp16():
    cfg = preset("llama3-70b")
    # 2 (K and V) × 80 layers × heads × 128 × 2 bytes
    assert kv_bytes_per_token(cfg, "mha", "float16") == 2 * 80 * 64 * 128 * 2  # ≈ 2.6 MB
    assert kv_bytes_per_token(cfg, "gqa", "float16") == 2 * 80 * 8 * 128 * 2   # ≈ 0.33 MB
    rows = {r["layout"]: r for r in plan(cfg, 4096, "float16")}
    assert abs(rows["mha"]["bytes_for_context"] / 1e9 - 10.7) < 0.05
    assert rows["gqa"]["configured"] and not rows["mha"]["configured"]


def test_deepseek_v3_mla_vs_mha():
    cfg = preset("deepseek-v3")
    assert kv_bytes_per_token(cfg) == 61 * (512 + 64) * 2
    assert kv_bytes_per_token(cfg, "mha") == 61 * 128 * ((128 + 64) + 128) * 2


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_planner_matches_the_cache_the_model_allocates(attention):
    cfg = Config(vocab_size=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=32,
                 attention=attention, kv_lora_rank=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, dtype="bfloat16")
    cache = abstract_model(cfg).init_cache(2, 10)
    assert cache.nbytes == kv_bytes_per_token(cfg) * 2 * 10


def test_cli_prints_table_and_rejects_bad_input(capsys):
    assert main(["--preset", "llama3-70b", "--dtype", "float16", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "2.62 MB" in out and "10.7 GB" in out
    assert main(["--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--context", "0"]) == 2
