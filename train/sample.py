"""The end-of-training sample: `jaxlm.infer.generate` when inference provides it, else a
small greedy KV-cache loop kept here (temporary, until jaxlm.infer.generate exists)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model import CausalLM


def generate_text(lm: CausalLM, tokenizer, prompt: str, max_new_tokens: int,
                  seed: int = 0) -> str:
    ids = tokenizer.encode(prompt) or [0]
    try:
        from jaxlm.infer import generate
    except ImportError:
        generate = None
    new = None
    if generate is not None:
        try:
            new = _first_row(generate(lm, [ids], max_new_tokens=max_new_tokens, seed=seed))
        except (TypeError, ValueError):  # an interface this code predates: fall back
            new = None
    if new is None:
        new = greedy(lm, ids, max_new_tokens)
    return prompt + tokenizer.decode(new)


def _first_row(out):
    """The new tokens of the first prompt, whatever container generate returns."""
    row = out[0] if not hasattr(out, "tokens") else out.tokens[0]
    return [int(t) for t in jnp.asarray(row).reshape(-1)]


def greedy(lm: CausalLM, ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding through the KV cache: one prefill, then one jitted call per token."""
    max_len = min(len(ids) + max_new_tokens, lm.cfg.max_position)
    ids = ids[-(max_len - 1):] if len(ids) >= max_len else ids
    steps = max_len - len(ids)
    graphdef, state = nnx.split(lm)

    @jax.jit
    def forward(state, tokens, cache):
        logits, cache, _ = nnx.merge(graphdef, state)(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    nxt, cache = forward(state, jnp.asarray([ids], jnp.int32), lm.init_cache(1, max_len))
    out = []
    for _ in range(steps):
        out.append(int(nxt[0]))
        if len(out) == steps:
            break
        nxt, cache = forward(state, nxt[:, None], cache)
    return out
