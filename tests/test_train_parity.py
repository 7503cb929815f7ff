"""Gradient parity: one training step's loss and every gradient of a Llama-style model
equal transformers + torch on the same weights and batch (float32, 1e-4 relative)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import safetensors.numpy  # noqa: E402

from jaxlm.model import from_hf, to_hf  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402
from jaxlm.model.build import SplitModel  # noqa: E402
from jaxlm.train.step import loss_and_grads  # noqa: E402


def _relative(a, b):
    """‖a − b‖ / ‖b‖ over a whole tensor (elementwise ratios blow up near zero)."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_gradients_equal_transformers(tmp_path, tied):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2,
        tie_word_embeddings=tied, attention_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    hf.save_pretrained(tmp_path / "hf")
    model = SplitModel(from_hf(str(tmp_path / "hf")))

    tokens = np.random.default_rng(0).integers(0, 61, size=(3, 17))
    hf.zero_grad()
    out = hf(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    torch_grads = {n: p.grad.detach().numpy() for n, p in hf.named_parameters()}

    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch = {"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:],
             "positions": np.broadcast_to(np.arange(t), (1, b, t)),
             "segment_ids": np.zeros((1, b, t), np.int32),
             "loss_mask": np.ones((1, b, t), bool)}
    batch = {k: jnp.asarray(v, jnp.bool_ if k == "loss_mask" else jnp.int32)
             for k, v in batch.items()}
    loss, grads, _ = loss_and_grads(model, TrainConfig(), model.params, batch)
    assert abs(float(loss) - out.loss.item()) <= 1e-4 * out.loss.item()

    # The gradients take the parameters' way out: to_hf lays them out as HF tensors.
    to_hf(model.merge(grads), str(tmp_path / "grads"))
    ours = safetensors.numpy.load_file(str(tmp_path / "grads" / "model.safetensors"))
    assert set(ours) == set(torch_grads) or (tied and set(ours) | {"lm_head.weight"} ==
                                             set(torch_grads))
    for name, g in ours.items():
        err = _relative(g, torch_grads[name])
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
