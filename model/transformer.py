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

from . import context
from .attention import Attention
from .cache import (KVCache, MLACache, create_cache, heads_to_layout, is_int8, quantized_news,
                    slot_axis, write_layer)
from .config import Config, LayerKind
from .heads import MedusaHead, MTPModule
from .layers import MLP, Dense, Embed, Norm, make_param
from .mla import MLAttention
from .moe import MoE
from .peft import PeftInputs
from .quant import quantize_in_place


class Output(NamedTuple):
    logits: jax.Array               # [b,t,v] float32
    cache: KVCache | MLACache | None  # updated cache, or None when none was given
    aux: dict[str, Any]             # MoE losses/metrics averaged over MoE layers; {} if none


class Block(nnx.Module):
    """One pre-norm (or post-norm) residual block: attention, then MLP or MoE."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, kind: LayerKind | None = None):
        kind = kind or LayerKind(moe=False, window=cfg.sliding_window)
        self.post_norm = cfg.post_norm
        self.attn_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.attn = (MLAttention if cfg.attention == "mla" else Attention)(cfg, rngs,
                                                                          kind.window)
        self.mlp_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.mlp = MoE(cfg, rngs) if kind.moe else MLP(cfg, rngs)
        # Bottleneck adapters on the sublayer outputs (jaxlm.model.peft), when attached.
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def _attention(self, x, positions, peft, attn_kwargs):
        with jax.named_scope("attention"):
            a, kv = self.attn(x, positions, peft=peft, **attn_kwargs)
        if self.attn_adapter is not None:
            a = self.attn_adapter(a, peft)
        return a, kv

    def _ffn(self, x, peft):
        with jax.named_scope("moe" if isinstance(self.mlp, MoE) else "mlp"):
            out = self.mlp(x, peft)
        f, aux = out if isinstance(out, tuple) else (out, {})
        if self.mlp_adapter is not None:
            f = self.mlp_adapter(f, peft)
        return f, aux

    def __call__(self, x, positions, *, peft=None, dropout_key=None, **attn_kwargs):
        """Returns (x, updated kv buffers or None, aux dict of this layer). peft: the
        adapters' PeftInputs (row ids); dropout_key: this layer's LoRA dropout key."""
        if dropout_key is not None:
            peft = PeftInputs(ids=None if peft is None else peft.ids, key=dropout_key)
        if self.post_norm:
            a, kv = self._attention(x, positions, peft, attn_kwargs)
            x = _norm(self.attn_norm, "attn_norm", x + a)
            f, aux = self._ffn(x, peft)
            return _norm(self.mlp_norm, "mlp_norm", x + f), kv, aux
        a, kv = self._attention(_norm(self.attn_norm, "attn_norm", x), positions, peft,
                                attn_kwargs)
        x = x + a
        f, aux = self._ffn(_norm(self.mlp_norm, "mlp_norm", x), peft)
        return x + f, kv, aux


def _norm(norm: Norm, name: str, x):
    with jax.named_scope(name):
        return norm(x)


def stacked_blocks(cfg: Config, rngs: nnx.Rngs, n: int, kind: LayerKind):
    """n independently initialised Blocks whose parameters share a leading 'layers' axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r, kind)
    return make(rngs)


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_blocks(blocks, x, kv, cfg: Config, per_layer=None, **block_kwargs):
    """Run stacked blocks over x with lax.scan.

    kv: a tuple of cache buffers stacked on the layer axis, or None. per_layer: a dict of
    keyword arguments whose arrays have a leading layer axis (each block gets its slice).
    Returns (x, updated buffers, aux with a leading layer axis)."""
    graphdef, state = nnx.split(blocks)

    def body(h, layer):
        layer_state, layer_kv, extra = layer
        h, layer_kv, aux = nnx.merge(graphdef, layer_state)(h, kv=layer_kv, **extra,
                                                            **block_kwargs)
        return h, (layer_kv, aux)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x, (kv, aux) = jax.lax.scan(body, x, (state, kv, per_layer or {}))
    return x, kv, aux


def _mean_over_layers(per_group_aux):
    """Average each aux entry over every layer that produced it (MoE layers only), and
    keep each MoE layer's expert load, in layer order, as "expert_load_per_layer"
    [MoE layers, e]: what aux-loss-free balancing moves each layer's router bias by."""
    stacked = [a for a in per_group_aux if a]
    if not stacked:
        return {}
    joined = {key: jnp.concatenate([a[key] for a in stacked]) for key in stacked[0]}
    out = {key: jnp.mean(value, axis=0) for key, value in joined.items()}
    if "expert_load" in joined:
        out["expert_load_per_layer"] = joined["expert_load"]
    return out


class CausalLM(nnx.Module):
    """embed → blocks → final norm → LM head. Its pieces (embed_inputs, position_signals,
    the Blocks, head) are what every forward pass calls: __call__ below (training,
    prefill, decode) and the engine's per-layer loop (jaxlm.infer.forward)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = (make_param(rngs, (cfg.max_position, cfg.d_model), (None, "embed"),
                                     "normal", cfg)
                          if cfg.position == "learned" else None)
        # Runs of identical layers (e.g. DeepSeek's first k dense, then MoE), one scan each.
        self.blocks = nnx.List([stacked_blocks(cfg, rngs, n, kind)
                                for kind, n in cfg.layer_groups()])
        self.final_norm = Norm(cfg, cfg.d_model, "embed", rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",),
                              bias=False, rngs=rngs))
        # Extra heads (jaxlm.model.heads), made last so the weights above do not depend on them
        self.mtp = (nnx.List([MTPModule(cfg, rngs) for _ in range(cfg.mtp_depth)])
                    if cfg.mtp_depth else nnx.data(None))
        self.medusa = (nnx.List([MedusaHead(cfg, rngs) for _ in range(cfg.medusa_heads)])
                       if cfg.medusa_heads else nnx.data(None))
        self.prefix = nnx.data(None)  # prefix tuning's virtual tokens (jaxlm.model.peft.Prefix)
        self.peft_spec = None   # the spec of the attached adapter, if any
        if cfg.weight_quant is not None:  # built quantized (jaxlm.model.quant)
            quantize_in_place(self, cfg.weight_quant, cfg.quant_group)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
        """A KVCache (or MLACache) for `batch` rows of up to max_len positions: empty, or
        with prefix tuning's P virtual tokens already in slots 0..P-1 (lengths P)."""
        cache = create_cache(self.cfg, batch, max_len or self.cfg.max_position, dtype)
        if self.prefix is None or not self.prefix.enabled:
            return cache
        int8 = is_int8(cache.buffers)
        kv = self.prefix.kv(jnp.float32 if int8 else cache.k.dtype)  # [l,2,P,kh,hd]
        p = kv.shape[2]
        if p >= cache.max_len:
            raise ValueError(f"the cache ({cache.max_len} slots) must hold the prefix's "
                             f"{p} virtual tokens and more")
        axis = cache.slot_axis
        rows = lambda a: jnp.broadcast_to(heads_to_layout(a[None], axis),  # noqa: E731
                                          (batch, *heads_to_layout(a[None], axis).shape[1:]))
        zeros = jnp.zeros((batch,), jnp.int32)

        def write(bufs, layer_kv):   # one layer: the prefix's K and V into slots 0..P-1
            news = quantized_news(bufs, (rows(layer_kv[0]), rows(layer_kv[1])))
            return tuple(write_layer(b, n, zeros, axis) for b, n in zip(bufs, news))
        buffers = jax.vmap(write)(cache.buffers, kv)
        return cache.with_buffers(buffers, jnp.full((batch,), p, jnp.int32))

    # The pieces of the forward pass --------------------------------------------------
    def embed_inputs(self, tokens, positions):
        """Token embeddings plus absolute position embeddings (learned or sinusoidal):
        x [b,t,d]. Positions past a learned table (the padding of a batched prefill,
        never attended) read its last row rather than NaN. Under a 'sequence' mesh axis x
        is split along t from here on (jaxlm.model.context)."""
        cfg = self.cfg
        with jax.named_scope("embed"):
            x = self.embed(tokens)
            if self.pos_embed is not None:
                table = self.pos_embed[...]
                rows = jnp.minimum(positions, table.shape[0] - 1)
                x = x + jnp.take(table, rows, axis=0).astype(x.dtype)
            elif cfg.position == "sinusoidal":
                x = x + ops.sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
            return context.split_lengths(x)

    def position_signals(self, positions):
        """(rope cos/sin, alibi slopes) the attention layers need; both None when unused."""
        cfg = self.cfg
        if cfg.position == "rope":
            seq_len = jnp.max(positions) + 1  # read by dynamic-NTK scaling only
            inv_freq, factor = ops.rope_frequencies(cfg.rotary_dim, cfg.rope_theta,
                                                    cfg.rope_scaling, seq_len)
            return ops.rope_cos_sin(positions, inv_freq, factor), None
        if cfg.position == "alibi":
            return None, ops.alibi_slopes(cfg.n_heads)
        return None, None

    def final_hidden(self, x):
        """The final norm: the hidden state the LM head (and MTP/Medusa heads) read."""
        return _norm(self.final_norm, "final_norm", x)

    def project(self, h, peft: PeftInputs | None = None):
        """LM head over final hidden states: float32 logits [b,t,v] (soft-capped if
        configured). peft: inputs of a LoRA on lm_head (row ids, dropout key)."""
        cfg = self.cfg
        with jax.named_scope("lm_head"):
            logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h, peft)
            # a vocabulary padded to split over a mesh (infer.forward): its pad columns go
            logits = logits[..., :cfg.vocab_size].astype(jnp.float32)
            if cfg.final_softcap is not None:
                logits = ops.soft_cap(logits, cfg.final_softcap)
            return logits

    def head(self, x, peft: PeftInputs | None = None):
        """Final norm and LM head: float32 logits [b,t,v]."""
        return self.project(self.final_hidden(x), peft)

    def mtp_logits(self, k: int, h, peft: PeftInputs | None = None):
        """MTP module k's (0-based) logits over its block output h [b,t,d]: its own norm,
        then the shared LM head (with its adapter, if it has one: peft as project's)."""
        return self.project(self.mtp[k].head_norm(h), peft)

    def medusa_logits(self, h):
        """Every Medusa head's logits over final hidden states h [b,t,d]: [K,b,t,v]."""
        return jnp.stack([head(h) for head in self.medusa])

    def check_inputs(self, tokens, cache, segment_ids=None) -> None:
        """ValueErrors for calls that cannot mean anything."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if cache is None:
            return
        if cache.batch != tokens.shape[0]:
            raise ValueError(f"cache has {cache.batch} rows but tokens have {tokens.shape[0]}")
        if cache.slot_axis != slot_axis(self.cfg):
            raise ValueError(f"cache laid out for another attention_impl than "
                             f"{self.cfg.attention_impl!r}; make it with this model's init_cache")
        if segment_ids is not None:
            raise ValueError("segment_ids are for packed training; don't pass them with a cache")

    def __call__(self, tokens, positions=None, cache: KVCache | None = None, *,
                 segment_ids=None, peft: PeftInputs | None = None) -> Output:
        """tokens [b,t] int; positions [b,t] (default: continue from the cache lengths);
        segment_ids [b,t] keeps packed documents apart (training only); peft: inputs of
        attached adapters (PeftInputs: a LoRA dropout key in training, row ids of stacked
        adapters). With prefix tuning and no cache, positions count from the P virtual
        tokens (P..), as they do in a cache made by init_cache."""
        x, cache, aux, _, head_peft = self._trunk(tokens, positions, cache, segment_ids, peft)
        return Output(self.head(x, head_peft), cache, aux)

    def with_heads(self, tokens, positions=None, *, segment_ids=None,
                   peft: PeftInputs | None = None):
        """Training with the extra heads: (logits [b,t,v], aux, mtp [D,b,t,v], medusa
        [K,b,t,v]). mtp[k] at position i predicts token i+k+2 (the targets k+1 ahead),
        given the tokens up to i+k+1; medusa[k] predicts the same token from h_i alone.
        Tokens past the end are 0 and their positions must be masked out of any loss, as
        must those whose tokens ahead lie in another packed document."""
        if context.sequence_size() > 1:
            raise ValueError("MTP and Medusa heads read the tokens ahead of each position, "
                             "which a 'sequence' mesh axis puts on other devices; train "
                             "them without one")
        x, _, aux, (positions, rope, alibi), head_peft = self._trunk(
            tokens, positions, None, segment_ids, peft)
        h = self.final_hidden(x)
        logits = self.project(h, head_peft)
        mtp = medusa = None
        if self.mtp is not None:
            per_depth, hk = [], h
            for k, module in enumerate(self.mtp):
                ahead = jnp.pad(tokens[:, k + 1:], ((0, 0), (0, k + 1)))
                hk, _, _ = module(hk, self.embed(ahead), positions, rope=rope, alibi=alibi,
                                  segment_ids=segment_ids)
                per_depth.append(self.mtp_logits(k, hk))
            mtp = jnp.stack(per_depth)
        if self.medusa is not None:
            medusa = self.medusa_logits(h)
        return logits, aux, mtp, medusa

    def _trunk(self, tokens, positions, cache, segment_ids, peft):
        """Embeddings and blocks: (x [b,t,d] before the final norm, cache, aux,
        (positions, rope, alibi), the head's PeftInputs)."""
        cfg = self.cfg
        self.check_inputs(tokens, cache, segment_ids)
        b, t = tokens.shape
        starts = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
        if positions is None:
            positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)
        prefix = None
        if self.prefix is not None and self.prefix.enabled and cache is None:
            prefix = self.prefix.kv(jnp.dtype(cfg.dtype))          # [l,2,P,kh,hd]
            positions = positions + prefix.shape[2]
        key = None if peft is None else peft.key
        peft = None if peft is None else PeftInputs(ids=peft.ids)

        x = self.embed_inputs(tokens, positions)
        rope, alibi = self.position_signals(positions)
        new_buffers, group_aux, first = [], [], 0
        for g, (group, (_, n)) in enumerate(zip(self.blocks, cfg.layer_groups())):
            kv = (None if cache is None else
                  tuple(buf[first:first + n] for buf in cache.buffers))
            per_layer = {}
            if prefix is not None:
                per_layer["prefix"] = (prefix[first:first + n, 0], prefix[first:first + n, 1])
            if key is not None:
                per_layer["dropout_key"] = jax.random.split(jax.random.fold_in(key, g), n)
            x, kv, aux = scan_blocks(group, x, kv, cfg, per_layer, positions=positions,
                                     rope=rope, alibi=alibi, starts=starts,
                                     segment_ids=segment_ids, peft=peft)
            new_buffers.append(kv)
            group_aux.append(aux)
            first += n
        head_key = None if key is None else jax.random.fold_in(key, len(self.blocks))
        head_peft = PeftInputs(ids=None if peft is None else peft.ids, key=head_key)
        if cache is not None:
            buffers = (new_buffers[0] if len(new_buffers) == 1 else
                       tuple(jnp.concatenate(parts) for parts in zip(*new_buffers)))
            cache = cache.with_buffers(buffers, starts + t)
        return x, cache, _mean_over_layers(group_aux), (positions, rope, alibi), head_peft
