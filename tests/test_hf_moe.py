"""HF parity for the MoE / MLA families: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
import jax.numpy as jnp  # noqa: E402

from jaxlm.model import config_from_hf, from_hf, hf_config_from, to_hf  # noqa: E402

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
    # Layer patterns: MoE only on layer 1 (decoder_sparse_step=2, layer 3 MLP-only), and
    # Qwen2-MoE's default sliding rule (layers 0, 2, .. below max_window_layers: layer 0)
    # with a window shorter than the 13 tokens; Qwen3-MoE with its middle layer MLP-only
    # (and its one window for every layer).
    "qwen2_moe_layers": lambda: T.Qwen2MoeConfig(
        **SMALL, num_hidden_layers=4, num_key_value_heads=2, moe_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=20,
        decoder_sparse_step=2, mlp_only_layers=[3], use_sliding_window=True, sliding_window=4,
        max_window_layers=1),
    "qwen3_moe_layers": lambda: T.Qwen3MoeConfig(
        **SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=12,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1], use_sliding_window=True, sliding_window=4),
}
# The scan groups each import must make: (MoE?, window, layers).
GROUPS = {"mixtral": [(True, None, 2)], "qwen2_moe": [(True, None, 2)],
          "qwen3_moe": [(True, None, 2)], "deepseek_v3": [(False, None, 1), (True, None, 2)],
          "qwen2_moe_layers": [(False, 4, 1), (True, None, 1), (False, None, 2)],
          "qwen3_moe_layers": [(True, 4, 1), (False, 4, 1), (True, 4, 1)]}
PATTERN_KEYS = ("layer_types", "sliding_window", "mlp_only_layers", "decoder_sparse_step",
                "first_k_dense_replace")


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
    assert [(k.moe, k.window, n) for k, n in lm.cfg.layer_groups()] == GROUPS[family]
    got = np.asarray(lm(jnp.asarray(tokens)).logits)
    assert np.abs(got - want).max() <= 1e-4

    to_hf(lm, str(tmp_path / "out"))
    back, info = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for key in PATTERN_KEYS:  # the layer pattern is written back as transformers holds it
        assert getattr(back.config, key, None) == getattr(cfg, key, None), key
    with torch.no_grad():
        again = back.eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(again - want).max() <= 1e-4


# DeepSeek's moe_layer_freq: transformers 5 has no such field (every layer from
# first_k_dense_replace on is MoE there), so the > 1 case is checked against DeepSeek's own
# rule and by round trips.
def deepseek(**keys):
    hf = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=24,
              num_attention_heads=4, moe_intermediate_size=16, n_routed_experts=8,
              num_experts_per_tok=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6,
              v_head_dim=6, q_lora_rank=12)
    return {**hf, **keys}


def deepseek_rule(n, first_k, freq):
    """DeepSeek's modelling code: layer i is MoE iff i >= first_k_dense_replace and
    i % moe_layer_freq == 0."""
    moe = []
    for i in range(n):
        moe.append(i >= first_k and i % freq == 0)
    return moe


@pytest.mark.parametrize("n, first_k, freq", [(6, 1, 2), (7, 0, 3), (8, 3, 2), (5, 3, 2),
                                              (5, 2, 1), (4, 0, None), (4, 4, 2)])
def test_deepseek_moe_layer_freq_follows_deepseek(n, first_k, freq):
    hf = deepseek(num_hidden_layers=n, first_k_dense_replace=first_k, moe_layer_freq=freq)
    cfg = config_from_hf(hf)
    want = deepseek_rule(n, first_k, freq or 1)
    assert [cfg.is_moe_layer(i) for i in range(n)] == want
    out = hf_config_from(cfg)
    assert deepseek_rule(n, out["first_k_dense_replace"], out["moe_layer_freq"]) == want
    if any(want):  # with no MoE layer at all any freq would do
        assert (out["first_k_dense_replace"], out["moe_layer_freq"]) == (first_k, freq or 1)
    assert config_from_hf(out) == cfg


def test_moe_layer_patterns_without_hf_spelling_raise():
    cfg = config_from_hf(deepseek(num_hidden_layers=4, first_k_dense_replace=1))
    with pytest.raises(ValueError, match="DeepSeek's rule"):  # MoE layers 1 and 3 only
        hf_config_from(cfg.replace(mlp_only_layers=(2,)))
    mixtral = config_from_hf(T.MixtralConfig(**SMALL, num_hidden_layers=3, num_key_value_heads=2,
                                             num_local_experts=4))
    with pytest.raises(ValueError, match="mixtral.*mlp_only_layers=.1.*leave layers .1. dense"):
        hf_config_from(mixtral.replace(mlp_only_layers=(1,)))


def test_qwen_moe_first_k_dense_exports_as_mlp_only_layers():
    cfg = config_from_hf(CONFIGS["qwen3_moe_layers"]()).replace(first_k_dense=1,
                                                              mlp_only_layers=(2,))
    hf = hf_config_from(cfg)
    assert hf["mlp_only_layers"] == [0, 2]
    back = config_from_hf(hf)
    assert [back.layer_kind(i) for i in range(3)] == [cfg.layer_kind(i) for i in range(3)]
