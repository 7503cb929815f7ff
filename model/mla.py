"""Multi-head latent attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent c [b,s,r] per token (r = kv_lora_rank)
plus a single RoPE key k_rope [b,s,dr] shared by all heads; only these two go into
the cache: (r + dr) numbers per token per layer instead of 2·h·d.

Per head, with W_uk [r,h,dn] and W_uv [r,h,dv] the two halves of kv_b:
  naive:     k_h = c·W_uk,h ⊕ k_rope,  v_h = c·W_uv,h,  standard attention over h heads
  absorbed:  q_h·k_h = (q_nope,h·W_uk,hᵀ)·c + q_rope,h·k_rope, so fold W_uk into the
             query and attend over [c ⊕ k_rope] as one shared KV head (MQA over the
             latent); the output o_h = Σ p·c is lifted by W_uv afterwards.
Both give the same numbers; the absorbed path never materialises per-head keys.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm import ops

from . import context
from .cache import is_int8, quantized_news, write_layer
from .config import Config
from .layers import Dense, RMSNorm, residual_std


class MLAttention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, window: int | None = None):
        d, h = cfg.d_model, cfg.n_heads
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.cfg = cfg
        self.window = window  # this layer's sliding window (Config.layer_window)
        if cfg.q_lora_rank:
            rq = cfg.q_lora_rank
            self.q_a = Dense(cfg, (d,), (rq,), ("embed",), ("q_lora",), bias=cfg.qkv_bias,
                             rngs=rngs)
            self.q_a_norm = RMSNorm(cfg, rq, "q_lora", rngs)
            self.q_b = Dense(cfg, (rq,), (h, dn + dr), ("q_lora",), ("heads", "head_dim"),
                             bias=False, rngs=rngs)
            self.q_proj = None
        else:
            self.q_a = self.q_a_norm = self.q_b = None
            self.q_proj = Dense(cfg, (d,), (h, dn + dr), ("embed",), ("heads", "head_dim"),
                                bias=False, rngs=rngs)
        self.kv_a = Dense(cfg, (d,), (r + dr,), ("embed",), ("kv_lora",), bias=cfg.qkv_bias,
                          rngs=rngs)
        self.kv_a_norm = RMSNorm(cfg, r, "kv_lora", rngs)
        self.kv_b = Dense(cfg, (r,), (h, dn + dv), ("kv_lora",), ("heads", "head_dim"),
                          bias=False, rngs=rngs)
        self.o_proj = Dense(cfg, (h, dv), (d,), ("heads", "head_dim"), ("embed",),
                            bias=cfg.out_bias, rngs=rngs, std=residual_std(cfg))

    def _queries(self, x, peft):
        if self.q_proj is not None:
            return self.q_proj(x, peft)
        return self.q_b(self.q_a_norm(self.q_a(x, peft)), peft)

    def __call__(self, x, positions, *, rope, kv=None, starts=None, segment_ids=None,
                 alibi=None, peft=None, prefix=None, pages=None):
        """x [b,t,d]; kv = (latent [b,S,r], k_rope [b,S,dr]) cache buffers or None; with
        pages (a PageIndex), kv = (pool [P,z,1,r+dr],) and x packs one step's tokens."""
        del alibi  # MLA is rotary only (checked by Config)
        if prefix is not None:
            raise ValueError("prefix tuning needs per-head keys and values; MLA's cache "
                             "holds a latent instead (use LoRA for MLA models)")
        cfg = self.cfg
        dn, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        cos, sin = rope
        q = self._queries(x, peft)                             # [b,t,h,dn+dr]
        q_nope, q_rope = q[..., :dn], ops.apply_rope(q[..., dn:], cos, sin, cfg.rope_layout)
        ckv = self.kv_a(x, peft)                               # [b,t,r+dr]
        latent = self.kv_a_norm(ckv[..., :r])
        k_rope = ops.apply_rope(ckv[..., None, r:], cos, sin, cfg.rope_layout)[:, :, 0]

        mask_args = dict(causal=True, sliding_window=self.window,
                         scale=cfg.softmax_scale, softcap=cfg.attn_softcap,
                         implementation=cfg.attention_impl, variant=cfg.context_parallel)
        if pages is not None:
            return self._paged(x, q_nope, q_rope, latent, k_rope, positions, kv, pages,
                               mask_args, peft)
        scales = {}   # an int8 cache's scale [b,S,1 kv head], shared by keys and values
        if kv is None:
            mask_args.update(q_positions=positions, kv_positions=positions,
                             q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        else:
            news = quantized_news(kv, (latent, k_rope))
            kv = tuple(write_layer(buf, new, starts) for buf, new in zip(kv, news))
            b, s = kv[0].shape[:2]
            if not is_int8(kv):
                latent, k_rope = kv[0].astype(x.dtype), kv[1].astype(x.dtype)
            elif cfg.mla_absorb:  # int8 latent and key read as they are
                latent, k_rope = kv[:2]
                scales = dict(k_scale=kv[2], v_scale=kv[2])
            else:  # the naive form builds per-head keys from the latent: dequantize it
                latent, k_rope = (ops.dequantize_kv(buf, kv[2], x.dtype) for buf in kv[:2])
            mask_args.update(q_positions=positions,
                             kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
                             kv_lengths=starts + x.shape[1])

        w_kv = self.kv_b.weight(x.dtype)                       # [r,h,dn+dv] (+ LoRA)
        w_uk, w_uv = w_kv[..., :dn], w_kv[..., dn:]
        if cfg.mla_absorb:
            q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
            q_cat = jnp.concatenate([q_lat, q_rope], axis=-1)  # [b,t,h,r+dr]
            k_cat = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None, :]
            o_lat = context.attention(q_cat, k_cat, latent[:, :, None, :], **scales, **mask_args)
            out = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
        else:
            k_nope = jnp.einsum("bsr,rhn->bshn", latent, w_uk)
            v = jnp.einsum("bsr,rhv->bshv", latent, w_uv)
            k = jnp.concatenate(
                [k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))],
                axis=-1)
            out = context.attention(jnp.concatenate([q_nope, q_rope], axis=-1), k, v,
                                    **mask_args)
        return self.o_proj(out, peft), kv

    def _paged(self, x, q_nope, q_rope, latent, k_rope, positions, pools, pages, mask_args,
               peft):
        """The absorbed form over a paged [latent ⊕ k_rope] pool (one shared kv head whose
        values are the latent): the only form that never materialises per-head keys for
        every page, so paged MLA uses it whatever mla_absorb says (the two are equal)."""
        dn, r = self.cfg.qk_nope_head_dim, self.cfg.kv_lora_rank
        news = quantized_news(pools, (jnp.concatenate([latent, k_rope], -1)[0, :, None],))
        pools = tuple(ops.paged_write(p, new, pages.slots) for p, new in zip(pools, news))
        scales = dict(k_scales=pools[1][..., 0]) if is_int8(pools) else {}
        w_kv = self.kv_b.weight(x.dtype)
        w_uk, w_uv = w_kv[..., :dn], w_kv[..., dn:]
        q_cat = jnp.concatenate([jnp.einsum("bthn,rhn->bthr", q_nope, w_uk), q_rope], -1)
        o_lat = pages.attend(q_cat, positions, pools[0], None, v_dim=r,
                             attention_impl=self.cfg.attention_impl,
                             sliding_window=mask_args["sliding_window"],
                             scale=mask_args["scale"], softcap=mask_args["softcap"], **scales)
        out = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
        return self.o_proj(out, peft), pools
