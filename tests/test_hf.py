"""Hugging Face import/export: logits equal transformers' for every family, exports load
back into transformers unchanged, configs map both ways, and bad checkpoints fail loudly.

Every HF model here is a small random-init transformers model whose parameters are all
perturbed (norm scales ≠ 1, biases ≠ 0), so a swapped norm or a mis-shaped bias shows."""
import copy
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import safetensors.numpy  # noqa: E402
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from jaxlm import ops  # noqa: E402
from jaxlm.model import Config, config_from_hf, from_hf, hf_config_from, preset, to_hf  # noqa: E402
from jaxlm.ops.rope import RopeScaling  # noqa: E402

ATOL = 1e-4
V = 101
TOKENS = np.random.default_rng(0).integers(0, V, (2, 14)).astype(np.int32)
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25,
             max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(SIZES, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
                   rope_parameters=LLAMA3)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(SIZES, sliding_window=4)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(SIZES, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(SIZES, head_dim=24)),
    "gpt2": (GPT2Config, GPT2LMHeadModel,
             dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=32,
                  initializer_range=0.25)),
    # Per-layer sliding windows (4 < the 14 tokens): Qwen2 by its default rule (layers >=
    # max_window_layers slide), Qwen3 by an explicit layer_types that no rule gives.
    "qwen2_sliding": (Qwen2Config, Qwen2ForCausalLM,
                      dict(SIZES, num_hidden_layers=4, use_sliding_window=True,
                           sliding_window=4, max_window_layers=2)),
    "qwen3_sliding": (Qwen3Config, Qwen3ForCausalLM,
                      dict(SIZES, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention",
                                        "full_attention"])),
}
# The scan groups each import must make, as (window, layers); one full-attention group
# for the families not listed.
WINDOW_GROUPS = {"mistral": [(4, 2)], "qwen2_sliding": [(None, 2), (4, 2)],
                 "qwen3_sliding": [(4, 1), (None, 2)]}


def hf_model(family):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def jax_logits(lm, tokens=TOKENS):
    return np.asarray(lm(tokens).logits)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module", params=list(FAMILIES))
def ckpt(request, tmp_path_factory):
    """(family, HF model, its save_pretrained directory, HF logits, the imported CausalLM)."""
    family = request.param
    model = hf_model(family)
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)
    return family, model, path, hf_logits(model), from_hf(path)


def test_logits_match_transformers(ckpt):
    family, _, _, ref, lm = ckpt
    groups = [(kind.window, n) for kind, n in lm.cfg.layer_groups()]
    assert groups == WINDOW_GROUPS.get(family, [(None, lm.cfg.n_layers)])
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    assert max_diff(jax_logits(lm), ref) <= ATOL, family


def test_export_loads_in_transformers_unchanged(ckpt, tmp_path):
    family, model, path, ref, lm = ckpt
    to_hf(lm, str(tmp_path))
    back, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True,
                                                      attn_implementation="eager")
    assert type(back) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key in ("layer_types", "sliding_window"):
        assert getattr(back.config, key, None) == getattr(model.config, key, None), key
    assert max_diff(hf_logits(back.eval()), ref) <= ATOL, family
    # the very tensors transformers saved, bit for bit, under the same names
    original = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    exported = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


# Configs -------------------------------------------------------------------------------
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5e5},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
             "original_max_position_embeddings": 32, "beta_fast": 16.0},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale": 0.7,
                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_parameters_match_transformers(name):
    """cos/sin from the imported Config equal HF's rotary embedding (positions past
    max_position_embeddings, so dynamic NTK grows), before and after a config round trip."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    hf = LlamaConfig(**dict(SIZES, rope_parameters=dict(ROPES[name])))
    positions = np.arange(200)[None]
    x = torch.zeros(1, 200, 16)
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(hf)(x, torch.from_numpy(positions))
    cfg = config_from_hf(hf.to_dict())
    assert config_from_hf(hf_config_from(cfg)) == cfg
    inv_freq, factor = ops.rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                            positions.max() + 1)
    jcos, jsin = ops.rope_cos_sin(positions, inv_freq, factor)
    np.testing.assert_allclose(np.asarray(jcos), cos[..., :8].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jsin), sin[..., :8].numpy(), atol=1e-5)


def test_older_rope_spelling_is_read():
    old = dict(model_type="llama", **SIZES, rope_theta=5e5,
               rope_scaling={"type": "linear", "factor": 2.0})
    cfg = config_from_hf(old)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling("linear", 2.0)
    old["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    cfg = config_from_hf(old)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.kind == "llama3"
    assert cfg.rope_scaling.original_max_position == 32


@pytest.mark.parametrize("name", ["llama3-8b", "mistral-7b", "qwen2-0.5b", "qwen3-0.6b", "gpt2"])
def test_preset_configs_round_trip(name):
    cfg = preset(name)
    hf = hf_config_from(cfg)
    transformers.AutoConfig.for_model(**hf)  # transformers accepts the dict as written
    assert config_from_hf(hf) == cfg.replace(dtype=cfg.param_dtype)


@pytest.mark.parametrize("hf, match", [
    (dict(model_type="bert", architectures=["BertForMaskedLM"]), "llama.*gpt2"),
    (dict(model_type="qwen2", **SIZES, layer_types=["sliding_attention", "full_attention"]),
     "use_sliding_window"),  # a sliding layer without a window: transformers fails too
    (dict(model_type="qwen3", **SIZES, layer_types=["full_attention"]), "layer_types"),
    (dict(model_type="llama", **SIZES, rope_parameters={"rope_type": "longrope"}), "longrope"),
    (dict(model_type="llama", **SIZES, hidden_act="tanh"), "tanh"),
    (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True), "inverse_layer_idx"),
])
def test_unsupported_hf_configs_raise(hf, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("cfg, match", [
    (Config(position="alibi"), "position"),
    (Config(post_norm=True), "post_norm"),
    (Config(rope_layout="interleaved"), "rope_layout"),
    (Config(attention="mla"), "sigmoid"),               # MLA exists in HF only as DeepSeek-V3
    (Config(n_experts=4, first_k_dense=1), "first_k_dense"),  # Mixtral has no dense layers
    (Config(sliding_window=8, qkv_bias=True, out_bias=True), "biases"),
    # per-layer windows exist only in Qwen2/Qwen3(-MoE): Qwen2 needs its q/k/v bias
    (Config(sliding_window=8, sliding_layers=(1,)), "qwen2.*qkv_bias must be True"),
    (Config(sliding_window=8, sliding_layers=(1,), n_experts=4), "mixtral.*sliding_layers"),
    (Config(sliding_window=8, sliding_layers=(0,), n_experts=4, qk_norm=True), "qwen3_moe"),
    (preset("gpt2", n_kv_heads=4), "n_kv_heads"),
])
def test_configs_without_hf_family_raise(cfg, match):
    with pytest.raises(ValueError, match=f"no Hugging Face equivalent.*{match}"):
        hf_config_from(cfg)


LAYER_TYPE_CASES = [dict(use_sliding_window=u, sliding_window=w, max_window_layers=m)
                    for u, w, m in ((True, 4, 2), (True, 4, 0), (True, 4, 5), (True, 4, 28),
                                    (False, 4, 2), (True, None, 2))]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen2_moe"])
@pytest.mark.parametrize("case", range(len(LAYER_TYPE_CASES)))
def test_default_layer_types_match_transformers(family, case):
    """Without layer_types, which layers slide follows each config class's own rule (they
    differ: Qwen2-MoE slides even layers *below* max_window_layers); the export writes
    layer_types explicitly and reads back to the same Config."""
    keys = dict(SIZES, num_hidden_layers=5, **LAYER_TYPE_CASES[case])
    if family == "qwen2_moe":
        keys.update(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                    num_experts_per_tok=2)
    hf = transformers.AutoConfig.for_model(family, **keys)
    want = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    if "sliding_attention" in hf.layer_types and not hf.sliding_window:  # 0 or None
        with pytest.raises(ValueError, match="use_sliding_window"):
            config_from_hf(dict(model_type=family, **keys))
        return
    cfg = config_from_hf(dict(model_type=family, **keys))  # no layer_types: the rule applies
    assert [cfg.layer_window(i) for i in range(5)] == want
    assert config_from_hf(hf_config_from(cfg)) == cfg
    assert config_from_hf(hf) == cfg  # transformers' own to_dict, layer_types included


def test_partial_windows_export_as_qwen2_and_round_trip():
    cfg = Config(sliding_window=8, sliding_layers=(0, 2), qkv_bias=True, n_kv_heads=2)
    hf = hf_config_from(cfg)
    assert hf["model_type"] == "qwen2" and hf["use_sliding_window"]
    assert hf["layer_types"] == ["sliding_attention", "full_attention"] * 2
    transformers.AutoConfig.for_model(**hf)
    assert config_from_hf(hf) == cfg
    everywhere = cfg.replace(sliding_layers=(0, 1, 2, 3))  # every layer: a plain window
    assert config_from_hf(hf_config_from(everywhere)) == everywhere.replace(sliding_layers=None)


# Checkpoint files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = hf_model("llama")
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    return model, path, hf_logits(model)


def rewrite(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if edit_config:
        config = edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"),
                                metadata={"format": "pt"})
    return str(dst)


def drop_missing(t):
    del t["model.layers.1.mlp.up_proj.weight"], t["lm_head.weight"]
    return t


def add_unexpected(t):
    return {**t, "model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}


def wrong_shape(t):
    return {**t, "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 64), np.float32)}


@pytest.mark.parametrize("edit, names", [
    (drop_missing, ["missing (2)", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]),
    (add_unexpected, ["unexpected (1)", "model.layers.0.self_attn.extra.weight"]),
    (wrong_shape, ["wrong shape (1)",
                   "model.layers.0.self_attn.q_proj.weight: expected [64, 64], got [8, 64]"]),
    (lambda t: wrong_shape(add_unexpected(drop_missing(t))),
     ["missing (2)", "unexpected (1)", "wrong shape (1)"]),
])
def test_mismatched_checkpoint_names_every_problem_at_once(llama, tmp_path, edit, names):
    path = rewrite(llama[1], tmp_path, edit)
    with pytest.raises(ValueError) as err:
        from_hf(path)
    for name in names:
        assert name in str(err.value)


def test_unknown_architecture_and_missing_weights_raise(llama, tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, f)
    with pytest.raises(ValueError, match="bert.*LlamaForCausalLM"):
        from_hf(str(tmp_path))
    shutil.copy(os.path.join(llama[1], "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        from_hf(str(tmp_path))


def test_tolerated_variants_load_the_same_model(llama, tmp_path):
    """Base-model names (no "model." prefix), a stray rotary inv_freq buffer, and a tied
    checkpoint whose config.json does not say so (lm_head.weight absent)."""
    model, path, ref = llama

    def base_model_names(t):
        out = {(k if k == "lm_head.weight" else k.removeprefix("model.")): v
               for k, v in t.items()}
        out["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        return out
    assert max_diff(jax_logits(from_hf(rewrite(path, tmp_path / "a", base_model_names))),
                    ref) <= ATOL

    def untie(c):
        del c["tie_word_embeddings"]
        return c

    def drop_lm_head(t):
        del t["lm_head.weight"]
        return t
    tied = from_hf(rewrite(path, tmp_path / "b", drop_lm_head, untie))
    assert tied.cfg.tie_embeddings and tied.lm_head is None


def test_sharded_checkpoint_loads(llama, tmp_path):
    model, _, ref = llama
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert max_diff(jax_logits(from_hf(str(tmp_path))), ref) <= ATOL


def test_bfloat16_checkpoint_loads(llama, tmp_path):
    rounded = copy.deepcopy(llama[0])  # float32 weights, each rounded to bfloat16
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    # (the bf16 model itself is no reference: .to(bfloat16) also rounds RoPE's inv_freq)
    copy.deepcopy(rounded).to(torch.bfloat16).save_pretrained(str(tmp_path))
    lm = from_hf(str(tmp_path))
    assert lm.cfg.param_dtype == "bfloat16" and lm.cfg.dtype == "bfloat16"
    assert lm.embed.embedding[...].dtype.name == "bfloat16"
    lm32 = from_hf(str(tmp_path), dtype="float32", param_dtype="float32")
    assert max_diff(jax_logits(lm32), hf_logits(rounded)) <= ATOL
    # written back as bfloat16 (from the bf16 model, and from float32 on request): the
    # very bits transformers saved, and transformers loads it as bfloat16
    original = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    for model, dtype in ((lm, None), (lm32, "bfloat16")):
        out = tmp_path / f"out_{dtype}"
        to_hf(model, str(out), dtype=dtype)
        exported = safetensors.numpy.load_file(str(out / "model.safetensors"))
        assert sorted(exported) == sorted(original)
        for name, value in original.items():
            assert exported[name].dtype == value.dtype
            np.testing.assert_array_equal(exported[name].view(np.uint16), value.view(np.uint16))
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16


def test_unreadable_dtype_is_reported_with_the_rest(llama, tmp_path):
    """FP8 has no numpy dtype: named in the one error, beside the other problems."""
    import safetensors.torch
    tensors = safetensors.torch.load_file(os.path.join(llama[1], "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    del tensors["model.norm.weight"]
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(llama[1], "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=f"missing.*model.norm.weight(.|\n)*dtype.*{name}: F8"):
        from_hf(str(tmp_path))
