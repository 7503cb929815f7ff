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
from .cache import KVCache, MLACache, create_cache, slot_axis
from .config import Config
from .layers import MLP, Dense, Embed, Norm, make_param
from .mla import MLAttention


class Output(NamedTuple):
    logits: jax.Array               # [b,t,v] float32
    cache: KVCache | MLACache | None  # updated cache, or None when none was given
    aux: dict[str, Any]             # MoE losses/metrics averaged over MoE layers; {} if none


class Block(nnx.Module):
    """One pre-norm (or post-norm) residual block: attention, then MLP or MoE."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, moe: bool = False):
        self.post_norm = cfg.post_norm
        self.attn_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.attn = (MLAttention if cfg.attention == "mla" else Attention)(cfg, rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        if moe:
            from .moe import MoE  # MoE pulls in ops.moe; dense models never need it
            self.mlp = MoE(cfg, rngs)
        else:
            self.mlp = MLP(cfg, rngs)

    def _ffn(self, x):
        out = self.mlp(x)
        return out if isinstance(out, tuple) else (out, {})

    def __call__(self, x, positions, **attn_kwargs):
        """Returns (x, updated kv buffers or None, aux dict of this layer)."""
        if self.post_norm:
            a, kv = self.attn(x, positions, **attn_kwargs)
            x = self.attn_norm(x + a)
            f, aux = self._ffn(x)
            return self.mlp_norm(x + f), kv, aux
        a, kv = self.attn(self.attn_norm(x), positions, **attn_kwargs)
        x = x + a
        f, aux = self._ffn(self.mlp_norm(x))
        return x + f, kv, aux


def stacked_blocks(cfg: Config, rngs: nnx.Rngs, n: int, moe: bool = False):
    """n independently initialised Blocks whose parameters share a leading 'layers' axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r, moe)
    return make(rngs)


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_blocks(blocks, x, kv, cfg: Config, **block_kwargs):
    """Run stacked blocks over x with lax.scan.

    kv: a tuple of cache buffers stacked on the layer axis, or None. Returns
    (x, updated buffers, aux with a leading layer axis)."""
    graphdef, state = nnx.split(blocks)

    def body(h, layer):
        layer_state, layer_kv = layer
        h, layer_kv, aux = nnx.merge(graphdef, layer_state)(h, kv=layer_kv, **block_kwargs)
        return h, (layer_kv, aux)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x, (kv, aux) = jax.lax.scan(body, x, (state, kv))
    return x, kv, aux


def _mean_over_layers(per_group_aux):
    """Average each aux entry over every layer that produced it (MoE layers only)."""
    stacked = [a for a in per_group_aux if a]
    if not stacked:
        return {}
    return {key: jnp.mean(jnp.concatenate([a[key] for a in stacked]), axis=0)
            for key in stacked[0]}


class CausalLM(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = (make_param(rngs, (cfg.max_position, cfg.d_model), (None, "embed"),
                                     "normal", cfg)
                          if cfg.position == "learned" else None)
        # Runs of identical layers (e.g. DeepSeek's first k dense, then MoE), one scan each.
        self.blocks = nnx.List([stacked_blocks(cfg, rngs, n, moe)
                                for moe, n in cfg.layer_groups()])
        self.final_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",),
                              bias=False, rngs=rngs))

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
        """A zero KVCache (or MLACache) for `batch` rows of up to max_len positions."""
        return create_cache(self.cfg, batch, max_len or self.cfg.max_position, dtype)

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
        if cache is not None and cache.slot_axis != slot_axis(cfg):
            raise ValueError(f"cache laid out for another attention_impl than "
                             f"{cfg.attention_impl!r}; make it with this model's init_cache")
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

        new_buffers, group_aux, first = [], [], 0
        for group, (_, n) in zip(self.blocks, cfg.layer_groups()):
            kv = (None if cache is None else
                  tuple(buf[first:first + n] for buf in cache.buffers))
            x, kv, aux = scan_blocks(group, x, kv, cfg, positions=positions, rope=rope,
                                     alibi=alibi, starts=starts, segment_ids=segment_ids)
            new_buffers.append(kv)
            group_aux.append(aux)
            first += n
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_softcap is not None:
            logits = ops.soft_cap(logits, cfg.final_softcap)
        if cache is not None:
            buffers = (new_buffers[0] if len(new_buffers) == 1 else
                       tuple(jnp.concatenate(parts) for parts in zip(*new_buffers)))
            cache = cache.with_buffers(buffers, starts + t)
        return Output(logits, cache, _mean_over_layers(group_aux))
