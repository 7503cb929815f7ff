"""Extra prediction heads that guess tokens past the next one, for training signals and
for speculative decoding's self-drafting (jaxlm.infer.speculative).

MTP (DeepSeek-V3, arXiv:2412.19437 §2.2): module k (k = 1..D) at position i combines
RMSNorm(Emb(t_{i+k})) with RMSNorm(h^{k-1}_i) through a projection [2d → d], runs one
transformer block and predicts t_{i+k+1} through its own norm and the model's shared LM
head. h^0 is the main model's final hidden state (after its final norm, what the LM head
reads, as vLLM and Megatron feed it); h^k is module k's block output. The embedding and
LM head are the model's own (shared, not copied).

Medusa (Cai et al. 2024, arXiv:2401.10774): head k (k = 1..K) maps the final hidden
state h_i through a residual SiLU block, h + SiLU(W·h + b), and its own LM head to a
guess of t_{i+1+k} (the model's head predicts t_{i+1}). W starts at zero and the LM head
as a copy of the model's (`init_medusa_from_head`), so an untrained head repeats the
model's next-token guess, as in the paper.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Config
from .layers import Dense, Norm, RMSNorm


# The extra heads' parameters: what a heads-only run trains (the base frozen, Medusa-1).
HEADS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("mtp"), nnx.PathContains("medusa")))


class MTPModule(nnx.Module):
    """One depth of multi-token prediction: enorm, hnorm, eh_proj, a Block, head_norm
    (DeepSeek-V3's HF names: enorm, hnorm, eh_proj, the decoder layer, shared_head.norm)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        from .transformer import Block  # transformer.py imports this module
        d = cfg.d_model
        self.enorm = RMSNorm(cfg, d, "embed", rngs)
        self.hnorm = RMSNorm(cfg, d, "embed", rngs)
        # [embedding ; hidden] → d, the order DeepSeek-V3's released eh_proj expects
        self.eh_proj = Dense(cfg, (2 * d,), (d,), (None,), ("embed",), bias=False, rngs=rngs)
        # the layer it would be as layer n_layers (DeepSeek-V3's MTP layer is an MoE layer)
        self.block = Block(cfg, rngs, cfg.layer_kind(cfg.n_layers))
        self.head_norm = Norm(cfg, d, "embed", rngs)

    def __call__(self, h, emb, positions, **block_kwargs):
        """h [b,t,d] the previous depth's hidden state, emb [b,t,d] the embeddings of the
        tokens k ahead; block_kwargs as Block takes them (rope, alibi, kv, starts,
        segment_ids). Returns (h^k [b,t,d], updated kv, aux)."""
        with jax.named_scope("mtp"):
            x = self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h)], axis=-1))
            return self.block(x, positions, **block_kwargs)


class MedusaHead(nnx.Module):
    """h + SiLU(W·h + b), then its own LM head: logits [b,t,v] float32."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d = cfg.d_model
        self.proj = Dense(cfg, (d,), (d,), (None,), ("embed",), bias=True, rngs=rngs, std=0.0)
        self.lm_head = Dense(cfg, (d,), (cfg.vocab_size,), ("embed",), ("vocab",), bias=False,
                             rngs=rngs)

    def __call__(self, h):
        with jax.named_scope("medusa"):
            h = h + jax.nn.silu(self.proj(h))
            return self.lm_head(h).astype(jnp.float32)


def init_medusa_from_head(lm, heads=None) -> None:
    """Medusa heads `heads` (indices; default all) get LM heads that copy the model's
    (Medusa's initialisation; the embedding transposed for a tied head). In place."""
    if lm.medusa is None:
        return
    w = (lm.embed.embedding[...].T if lm.lm_head is None else lm.lm_head.kernel[...])
    for i in range(len(lm.medusa)) if heads is None else heads:
        head = lm.medusa[i]  # own buffers: the trainer donates the heads, never the base
        head.lm_head.kernel[...] = jnp.array(w, dtype=head.lm_head.kernel[...].dtype, copy=True)
