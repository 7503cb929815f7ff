"""Adapters in Hugging Face PEFT's format, against PEFT itself (a test-only dependency).

* PEFT-saved LoRA (several target sets, a regex, rsLoRA, GPT-2's fused Conv1D modules) and
  prefix tuning (with and without the reparameterising MLP, grouped-query Llama and GPT-2)
  load onto from_hf of the same base and give PeftModel's forward logits, float32, ≤ 1e-4.
  Every PEFT adapter weight is perturbed first (LoRA B ≠ 0), so the adapter matters.
* jaxlm adapters exported with save_peft load in PeftModel.from_pretrained with jaxlm's
  logits; merge_and_unload() weights equal jaxlm's merged weights written by to_hf.
* Bottleneck adapters (no PEFT method) round-trip through the same two files.
* Unsupported configs and mismatched files fail in one ValueError naming the problem."""
import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")
import safetensors.numpy  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

from jaxlm.model import from_hf, to_hf  # noqa: E402
from jaxlm.model import peft as P  # noqa: E402
from jaxlm.model.io.peft import load_peft, save_peft  # noqa: E402

# Logits from transformers and XLA differ in their last bits, and by how much depends on
# the CPU (AVX2 vs AVX-512 vs ARM): tolerances are relative to the logits' magnitude.
RTOL = 1e-4
V = 97
TOKENS = np.random.default_rng(0).integers(0, V, (2, 11)).astype(np.int32)
BASES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        max_position_embeddings=128, attn_implementation="eager")),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64,
        initializer_range=0.2, attn_implementation="eager")),
}


def perturb(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family → (its save_pretrained directory, a loader giving a fresh HF model)."""
    out = {}
    for family, make in BASES.items():
        torch.manual_seed(0)
        model = make().eval()
        perturb(model)
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path)
        out[family] = (path, lambda m=model: copy.deepcopy(m))
    return out


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def tol(ref):
    """The largest difference allowed against reference logits `ref`."""
    return RTOL * max(1.0, float(np.abs(ref).max()))


def peft_adapter(bases, family, config, path, train_steps=0):
    """A PEFT model on the family's base with every adapter weight perturbed, saved to
    path; returns its forward logits."""
    model = peft_lib.get_peft_model(bases[family][1](), config)
    for name, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return torch_logits(model)


LORAS = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-rslora": ("llama", dict(r=8, lora_alpha=16, use_rslora=True,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])),
    "llama-regex": ("llama", dict(r=2, lora_alpha=6,
                                  target_modules=r".*\.(self_attn\.k_proj|mlp\.down_proj)")),
    "gpt2-fused": ("gpt2", dict(r=4, lora_alpha=4, fan_in_fan_out=True,
                                target_modules=["c_attn", "c_proj", "c_fc"])),
}


@pytest.mark.parametrize("case", list(LORAS))
def test_peft_saved_lora_gives_peft_logits(bases, case, tmp_path):
    family, kwargs = LORAS[case]
    ref = peft_adapter(bases, family, peft_lib.LoraConfig(task_type="CAUSAL_LM", **kwargs),
                       str(tmp_path))
    lm = from_hf(bases[family][0])
    base = np.asarray(lm(TOKENS).logits)
    load_peft(lm, str(tmp_path))
    got = np.asarray(lm(TOKENS).logits)
    assert diff(base, ref) > 50 * tol(ref)  # the adapter changes the logits...
    assert diff(got, ref) <= tol(ref), case  # ...exactly as PEFT's forward does


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_saved_prefix_gives_peft_forward_logits(bases, family, projection, tmp_path):
    """PEFT's forward pass (its generate drops the prefix in transformers 5): the real
    tokens sit at positions P.. after P virtual tokens in every layer's cache. Saved
    while training with prefix_projection, PEFT writes the MLP's output table."""
    config = peft_lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                         prefix_projection=projection,
                                         encoder_hidden_size=24)
    ref = peft_adapter(bases, family, config, str(tmp_path))
    lm = from_hf(bases[family][0])
    base = np.asarray(lm(TOKENS).logits)
    load_peft(lm, str(tmp_path))
    assert lm.peft_spec == P.PrefixSpec(tokens=5)
    assert diff(base, ref) > 50 * tol(ref)
    assert diff(np.asarray(lm(TOKENS).logits), ref) <= tol(ref)


def random_adapter(lm, spec, seed=1, std=0.2):
    """Attach spec to lm and give every adapter weight random values (B ≠ 0)."""
    P.attach(lm, spec, seed=seed)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(lm, P.Adapter)):
        var.set_value(jnp.asarray(rng.normal(0, std, var.shape), var.dtype))
    return lm


@pytest.mark.parametrize("family,spec", [
    ("llama", P.LoraSpec(r=4, alpha=12, targets=("q_proj", "k_proj", "o_proj", "up_proj"))),
    ("llama", P.LoraSpec(r=4, alpha=4, rslora=True, targets="(.*)down_proj")),
    ("gpt2", P.LoraSpec(r=3, alpha=6, targets=("c_attn", "c_fc"))),
], ids=["llama", "llama-regex-rslora", "gpt2"])
def test_jaxlm_lora_loads_in_peft_and_merges_to_the_same_weights(bases, family, spec,
                                                                tmp_path):
    path, fresh = bases[family]
    lm = random_adapter(from_hf(path), spec)
    want = np.asarray(lm(TOKENS).logits)
    save_peft(lm, str(tmp_path / "adapter"), base_model_name_or_path=path)
    model = peft_lib.PeftModel.from_pretrained(fresh(), str(tmp_path / "adapter")).eval()
    assert diff(torch_logits(model), want) <= tol(want)
    merged = model.merge_and_unload()
    P.merge(lm)
    to_hf(lm, str(tmp_path / "merged"))
    ours = safetensors.numpy.load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = {k: v.float().numpy() for k, v in merged.state_dict().items()}
    changed = 0
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], atol=1e-5, err_msg=name)
        changed += not np.allclose(value, fresh().state_dict()[name].numpy(), atol=1e-5)
    assert changed >= 2 * len(spec.targets if isinstance(spec.targets, tuple) else [1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jaxlm_prefix_loads_in_peft(bases, family, tmp_path):
    path, fresh = bases[family]
    lm = random_adapter(from_hf(path), P.PrefixSpec(tokens=3, projection=True, hidden=16))
    want = np.asarray(lm(TOKENS).logits)
    save_peft(lm, str(tmp_path))
    model = peft_lib.PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    assert diff(torch_logits(model), want) <= tol(want)
    back = load_peft(from_hf(path), str(tmp_path))   # the table, without the MLP
    assert diff(np.asarray(back(TOKENS).logits), want) <= tol(want)


def test_bottleneck_round_trips_through_the_same_files(bases, tmp_path):
    path, _ = bases["llama"]
    lm = random_adapter(from_hf(path), P.BottleneckSpec(dim=8, activation="gelu"))
    save_peft(lm, str(tmp_path))
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "JAXLM_BOTTLENECK"
    back = load_peft(from_hf(path), str(tmp_path))
    np.testing.assert_array_equal(np.asarray(back(TOKENS).logits), np.asarray(lm(TOKENS).logits))


def _write(path, config, tensors=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(tensors or {}, os.path.join(path, "adapter_model.safetensors"))


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("config,match", [
    ({"peft_type": "IA3", "target_modules": ["k_proj"]}, "peft_type 'IA3' is not supported"),
    (dict(LORA, target_modules=["qq_proj"]), "qq_proj"),
    (dict(LORA, use_dora=True), "use_dora=True"),
    (dict(LORA, bias="all"), "bias='all'"),
    (dict(LORA, modules_to_save=["lm_head"]), "modules_to_save"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": 3,
      "token_dim": 32, "num_attention_heads": 2}, "num_layers=3 \\(this model: 2\\)"),
])
def test_unsupported_configs_fail_in_one_line(bases, config, match, tmp_path):
    _write(str(tmp_path), config)
    lm = from_hf(bases["llama"][0])
    with pytest.raises(ValueError, match=match) as err:
        load_peft(lm, str(tmp_path))
    assert "\n" not in str(err.value)


def test_mismatched_tensors_are_all_reported_and_nothing_is_attached(bases, tmp_path):
    names = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{x}.weight"
             for i in range(2) for x in "AB"]
    tensors = {n: np.ones((2, 64) if n.endswith("A.weight") else (64, 2), np.float32)
               for n in names}
    del tensors[names[0]]
    tensors[names[3]] = np.ones((63, 2), np.float32)
    tensors["base_model.model.extra.lora_A.weight"] = np.ones((2, 2), np.float32)
    _write(str(tmp_path), LORA, tensors)
    lm = from_hf(bases["llama"][0])
    want = np.asarray(lm(TOKENS).logits)
    with pytest.raises(ValueError) as err:
        load_peft(lm, str(tmp_path))
    text = str(err.value)
    assert "missing (1)" in text and "unexpected (1)" in text and "wrong shape (1)" in text
    assert lm.peft_spec is None and not P.adapters_of(lm)
    np.testing.assert_array_equal(np.asarray(lm(TOKENS).logits), want)
