"""The decoder-only causal LM: embed → scanned blocks → final norm → LM head.

    logits, cache, aux = lm(tokens, positions, cache)

The same call serves training (cache=None), prefill and decode (a KVCache in,
the updated KVCache out). Identical blocks are stacked on a leading 'layers'
axis and run with lax.scan, so depth does not multiply compile time.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops

from .attention import Attention
from .cache import KVCache
from .config import Config
from .layers import MLP, Dense, Embed, Norm, make_param


class Output(NamedTuple):
    logits: jax.Array               # [b,t,v] float32
    cache: KVCache | None           # updated cache, or None when none was given
    aux: dict[str, Any]             # auxiliary losses/metrics (MoE balance, …)


class Block(nnx.Module):
    """One pre-norm (or post-norm) residual block: attention, then MLP."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.post_norm = cfg.post_norm
        self.attn_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, **attn_kwargs):
        if self.post_norm:
            a, kv = self.attn(x, positions, **attn_kwargs)
            x = self.attn_norm(x + a)
            return self.mlp_norm(x + self.mlp(x)), kv
        a, kv = self.attn(self.attn_norm(x), positions, **attn_kwargs)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


def stacked_blocks(cfg: Config, rngs: nnx.Rngs, n: int):
    """n independently initialised Blocks whose parameters share a leading 'layers' axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r)
    return make(rngs)


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_blocks(blocks, x, kv, cfg: Config, **block_kwargs):
    """Run stacked blocks over x with lax.scan; kv is (k [l,...], v [l,...]) or None."""
    graphdef, state = nnx.split(blocks)

    def body(h, layer):
        layer_state, layer_kv = layer
        h, layer_kv = nnx.merge(graphdef, layer_state)(h, kv=layer_kv, **block_kwargs)
        return h, layer_kv

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return jax.lax.scan(body, x, (state, kv))


class CausalLM(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = (make_param(rngs, (cfg.max_position, cfg.d_model), (None, "embed"),
                                     "normal", cfg)
                          if cfg.position == "learned" else None)
        self.blocks = stacked_blocks(cfg, rngs, cfg.n_layers)
        self.final_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",),
                              bias=False, rngs=rngs))

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        return KVCache.create(self.cfg, batch, max_len or self.cfg.max_position, dtype)

    def _position_signals(self, positions):
        """(rope cos/sin, alibi slopes) for this call; both None when unused."""
        cfg = self.cfg
        if cfg.position == "rope":
            seq_len = jnp.max(positions) + 1  # read by dynamic-NTK scaling only
            inv_freq, factor = ops.rope_frequencies(cfg.rotary_dim, cfg.rope_theta,
                                                    cfg.rope_scaling, seq_len)
            return ops.rope_cos_sin(positions, inv_freq, factor), None
        if cfg.position == "alibi":
            return None, ops.alibi_slopes(cfg.n_heads)
        return None, None

    def __call__(self, tokens, positions=None, cache: KVCache | None = None, *,
                 segment_ids=None) -> Output:
        """tokens [b,t] int; positions [b,t] (default: continue from the cache lengths);
        segment_ids [b,t] keeps packed documents apart (training only)."""
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        b, t = tokens.shape
        if cache is not None and cache.batch != b:
            raise ValueError(f"cache has {cache.batch} rows but tokens have {b}")
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are for packed training; don't pass them with a cache")
        starts = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
        if positions is None:
            positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)

        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        elif cfg.position == "sinusoidal":
            x = x + ops.sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
        rope, alibi = self._position_signals(positions)

        kv = None if cache is None else (cache.k, cache.v)
        x, kv = scan_blocks(self.blocks, x, kv, cfg, positions=positions, rope=rope,
                            alibi=alibi, starts=starts, segment_ids=segment_ids)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_softcap is not None:
            logits = ops.soft_cap(logits, cfg.final_softcap)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], lengths=starts + t)
        return Output(logits, cache, {})
