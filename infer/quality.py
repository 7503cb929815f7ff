"""What quantization costs in quality, measured the way it is usually reported.

    nll = mean_nll(lm, windows)                       # float weights, float cache
    nll8 = mean_nll(quantize(lm, "int8"), windows)    # int8 weights
    nllkv = mean_nll(lm, windows, cache_dtype="int8") # int8 KV cache
    ppl_increase = exp(nll8 - nll) - 1
    agree = greedy_agreement(engine_a, engine_b, prompts, 128)

`mean_nll` runs the windows through the cache path (prefill into a cache of the given
dtype), so with an int8 cache every query attends to keys and values as stored, quantized;
with cache_dtype=None it is the plain forward. Perplexity is exp of the mean NLL per token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model.transformer import CausalLM


def mean_nll(lm: CausalLM, windows, cache_dtype=None, batch: int = 8) -> float:
    """Mean next-token NLL (nats) over windows [n, t+1] of token ids (every position
    after the first is a target). cache_dtype: None, the plain forward; else the windows
    are prefilled into a cache of that dtype ("int8": quantized keys and values)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, t+1] token ids with t >= 1, got shape "
                         f"{windows.shape}")
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        if len(chunk) < batch:   # keep one compiled shape: pad with copies, count once
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        cache = (None if cache_dtype is None else
                 lm.init_cache(batch, chunk.shape[1] - 1, dtype=cache_dtype))
        n = min(batch, len(windows) - i)
        per_row = _rows_nll(lm, jnp.asarray(chunk), cache)
        total += float(per_row[:n].sum())
        count += n * (chunk.shape[1] - 1)
    return total / count


@nnx.jit
def _rows_nll(lm: CausalLM, tokens, cache):
    out = lm(tokens[:, :-1], cache=cache)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(-1)


def perplexity(nll: float) -> float:
    return math.exp(nll)


def greedy_agreement(a, b, prompts, max_new_tokens: int) -> dict:
    """Greedy continuations of the same prompts by two engines (or models):
    {'free': share of positions where b's free-running tokens equal a's, 'first_divergence':
    mean index of the first difference (max_new_tokens when none), 'teacher_forced': share
    of positions where b's greedy choice, fed a's tokens, equals a's}."""
    from .engine import generate
    out_a = generate(a, prompts, max_new_tokens=max_new_tokens)
    out_b = generate(b, prompts, max_new_tokens=max_new_tokens)
    same = [x == y for ra, rb in zip(out_a, out_b) for x, y in zip(ra, rb)]
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra))
             for ra, rb in zip(out_a, out_b)]
    lm_b = b if isinstance(b, CausalLM) else None
    forced = None
    if lm_b is not None:
        hits = total = 0
        for p, ra in zip(prompts, out_a):
            seq = jnp.asarray([list(p) + ra[:-1]], jnp.int32)
            pred = np.asarray(jnp.argmax(lm_b(seq).logits[0, len(p) - 1:], -1))
            hits += int((pred == np.asarray(ra)).sum())
            total += len(ra)
        forced = hits / total
    return {"free": float(np.mean(same)), "first_divergence": float(np.mean(first)),
            "teacher_forced": forced}
