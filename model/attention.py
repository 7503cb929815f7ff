"""Multi-head / grouped-query self-attention with RoPE, QK-norm and an explicit cache."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm import ops

from . import context
from .cache import heads_to_layout, is_int8, quantized_news, slot_axis, write_layer
from .config import Config
from .layers import Dense, RMSNorm, residual_std


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, window: int | None = None):
        d, h, kh, hd = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
        self.cfg = cfg
        self.window = window  # this layer's sliding window (Config.layer_window)
        self.q_proj = Dense(cfg, (d,), (h, hd), ("embed",), ("heads", "head_dim"),
                            bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = Dense(cfg, (d,), (kh, hd), ("embed",), ("kv_heads", "head_dim"),
                            bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = Dense(cfg, (d,), (kh, hd), ("embed",), ("kv_heads", "head_dim"),
                            bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = Dense(cfg, (h, hd), (d,), ("heads", "head_dim"), ("embed",),
                            bias=cfg.out_bias, rngs=rngs, std=residual_std(cfg))
        self.q_norm = RMSNorm(cfg, hd, "head_dim", rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg, hd, "head_dim", rngs) if cfg.qk_norm else None

    def __call__(self, x, positions, *, rope=None, alibi=None, kv=None, starts=None,
                 segment_ids=None, peft=None, prefix=None, pages=None):
        """x [b,t,d], positions [b,t]. With kv=(k_buf, v_buf) (laid out as cache.py says)
        the new keys are written at slots `starts` [b] and attention runs over the cache;
        (out [b,t,d], updated kv or None). prefix: prefix tuning's (keys, values) [P,kh,hd]
        at positions 0..P-1, seen by every query and every segment (training; inference
        holds them in the cache). peft: PeftInputs for attached LoRAs. pages: a PageIndex
        when kv is a paged pool pair (k [P,z,k,d], v) and x packs one step's tokens [1,T,d]."""
        cfg = self.cfg
        q, k, v = self.q_proj(x, peft), self.k_proj(x, peft), self.v_proj(x, peft)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = ops.apply_rope(q, cos, sin, cfg.rope_layout)
            k = ops.apply_rope(k, cos, sin, cfg.rope_layout)
        common = dict(causal=True, sliding_window=self.window, scale=cfg.softmax_scale,
                      softcap=cfg.attn_softcap, alibi_slopes=alibi,
                      implementation=cfg.attention_impl)
        if pages is not None:
            out, kv = self._paged(q, k, v, positions, kv, pages, common)
        elif kv is None and prefix is not None:
            out = self._with_prefix(q, k, v, positions, segment_ids, prefix, common)
        elif kv is None:
            out = context.attention(q, k, v, variant=cfg.context_parallel,
                                    q_positions=positions, kv_positions=positions,
                                    q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                    **common)
        else:
            axis = slot_axis(cfg)
            news = quantized_news(kv, (heads_to_layout(k, axis), heads_to_layout(v, axis)))
            kv = tuple(write_layer(buf, new, starts, axis) for buf, new in zip(kv, news))
            b, s = kv[0].shape[0], kv[0].shape[axis]
            slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            # For HEADS_FIRST this transpose folds into XLA attention's matmul (no copy).
            k_buf, v_buf = (heads_to_layout(buf, axis) for buf in kv[:2])
            scales = {}
            if is_int8(kv):  # int8 keys/values read as they are, their scales [b,s,k]
                scales = dict(k_scale=heads_to_layout(kv[2], axis)[..., 0],
                              v_scale=heads_to_layout(kv[3], axis)[..., 0])
            else:
                k_buf, v_buf = k_buf.astype(q.dtype), v_buf.astype(q.dtype)
            out = context.attention(q, k_buf, v_buf, variant=cfg.context_parallel,
                                    q_positions=positions, kv_positions=slots,
                                    kv_lengths=starts + x.shape[1], **scales, **common)
        return self.o_proj(out, peft), kv

    def _paged(self, q, k, v, positions, kv, pages, common):
        """Write the step's K/V into their pages, then attend segment by segment."""
        news = quantized_news(kv, (k[0], v[0]))
        kv = tuple(ops.paged_write(pool, new, pages.slots) for pool, new in zip(kv, news))
        scales = {}
        if is_int8(kv):
            scales = dict(k_scales=kv[2][..., 0], v_scales=kv[3][..., 0])
        out = pages.attend(q, positions, kv[0], kv[1],
                           attention_impl=self.cfg.attention_impl,
                           sliding_window=common["sliding_window"], scale=common["scale"],
                           softcap=common["softcap"], alibi_slopes=common["alibi_slopes"],
                           **scales)
        return out, kv

    def _with_prefix(self, q, k, v, positions, segment_ids, prefix, common):
        """Attention over [prefix ⊕ new] keys: the prefix at positions 0..P-1 with segment
        id -1 (every segment sees it), as the cache path sees it at slots 0..P-1."""
        if context.sequence_size() > 1:
            raise ValueError("prefix tuning does not train on a 'sequence' mesh axis (its "
                             "virtual tokens would have to reach every device); drop it")
        if self.cfg.attention_impl != "xla":
            raise ValueError("prefix tuning trains with attention_impl='xla' (the fused "
                             "kernels have no shared-prefix segment); set --model."
                             "attention_impl xla")
        b, p = q.shape[0], prefix[0].shape[0]
        pk, pv = (jnp.broadcast_to(a.astype(k.dtype), (b, *a.shape)) for a in prefix)
        kv_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
                                  positions], axis=1)
        kv_seg = None
        if segment_ids is not None:
            kv_seg = jnp.concatenate([jnp.full((b, p), -1, segment_ids.dtype), segment_ids], 1)
        return ops.attention(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1),
                             q_positions=positions, kv_positions=kv_pos,
                             q_segment_ids=segment_ids, kv_segment_ids=kv_seg, **common)
