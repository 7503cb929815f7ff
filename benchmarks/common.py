"""What the benchmark scripts share: the Llama-style model they compare on, the machine
line printed with every result, and the trainer's batch layout for a token array."""
from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

# hidden 512, 8 layers, 8 query / 2 KV heads, FFN 1408, vocab 32000 (transformers names)
MODEL = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=2048)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, jax {jax.__version__}"


def train_batch(tokens: np.ndarray) -> dict:
    """tokens [b, t+1] → one micro-batch [1, b, t] of the trainer's batch dict (one
    document per row: positions 0..t-1, no segment boundaries, every target counted)."""
    b, t = tokens.shape[0], tokens.shape[1] - 1
    return {"inputs": jnp.asarray(tokens[None, :, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[None, :, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
            "segment_ids": jnp.zeros((1, b, t), jnp.int32),
            "loss_mask": jnp.ones((1, b, t), bool)}


def trainer(model, tokens: np.ndarray, lr: float):
    """(run(n) → the last loss, the initial TrainState) for jaxlm's jitted train step
    (AdamW, no warm-up) over a SplitModel on one fixed batch; run blocks until done."""
    from jaxlm.train.config import TrainConfig
    from jaxlm.train.step import init_state, make_optimizer, make_train_step
    b, t = tokens.shape[0], tokens.shape[1] - 1
    tcfg = TrainConfig(lr=lr, warmup_steps=0, steps=10_000, seq_len=t, batch_size=b)
    opt = make_optimizer(tcfg, model.params)
    state = init_state(tcfg, model.cfg, model.params, opt, rest=model.rest.to_pure_dict())
    step = make_train_step(model, tcfg, opt)
    batch = train_batch(tokens)
    holder = {"state": state}

    def run(n):
        for _ in range(n):
            holder["state"], m = step(holder["state"], batch)
        return float(m["loss"])
    return run, state
