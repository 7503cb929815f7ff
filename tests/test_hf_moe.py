"""HF parity for the MoE / MLA families: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
import jax.numpy as jnp  # noqa: E402

from jaxlm.model import from_hf, to_hf  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, vocab_size=64,
             initializer_range=0.25)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                       num_local_experts=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                          moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2,
                                          shared_expert_intermediate_size=20),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                          head_dim=12, moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2, norm_topk_prob=True),
    # MLA (low-rank q, latent KV, decoupled RoPE key, YaRN with mscale), group-limited
    # sigmoid routing with a selection bias, a shared expert, the first layer dense.
    "deepseek_v3": lambda: T.DeepseekV3Config(
        **SMALL, num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=16,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=6, v_head_dim=6, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 8, "mscale": 0.8,
                         "mscale_all_dim": 0.8}),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_moe_family_logits_and_round_trip(family, tmp_path):
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # perturb everything so norms, biases and router bias are not trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.RandomState(0).randint(0, 64, (2, 13))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(want).max() > 1.0
    lm = from_hf(str(tmp_path / "hf"))
    got = np.asarray(lm(jnp.asarray(tokens)).logits)
    assert np.abs(got - want).max() <= 1e-4

    to_hf(lm, str(tmp_path / "out"))
    back, info = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        again = back.eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(again - want).max() <= 1e-4
