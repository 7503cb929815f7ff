"""Per-row pieces the scheduler's device programs share (infer/steps.py,
infer/spec_rows.py): each row's sampling settings and keys, the stacked-adapter ids as
the model takes them, and where the page pools live on a mesh."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.peft import PeftInputs
from jaxlm.model.sharding import activation_sharding
from jaxlm.ops.sampling import greedy, probabilities_rows, sample_rows
from jaxlm.ops.speculative import greedy_accept, rejection_accept


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "temperature", "top_k", "top_p", "min_p", "seeds", "counters"], meta_fields=[])
@dataclasses.dataclass
class RowSampling:
    """Each row's sampling settings and key material, [n] each (0 temperature: greedy)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seeds: jax.Array
    counters: jax.Array      # tokens the row has generated: the key is fold_in(seed, it)

    @classmethod
    def empty(cls, n: int) -> "RowSampling":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                   np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.int32))

    def set(self, r: int, request, generated: int) -> None:
        s = request.sampling
        if s is not None and not s.greedy:
            self.temperature[r], self.top_k[r] = s.temperature, s.top_k or 0
            self.top_p[r], self.min_p[r] = s.top_p or 1.0, s.min_p or 0.0
        self.seeds[r], self.counters[r] = request.seed % (1 << 31), generated

    def keys(self, offset=0):
        return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(
            self.seeds, self.counters + offset)

    def sample(self, logits, offset=0):
        return sample_rows(self.keys(offset), logits, self.temperature, self.top_k,
                           self.top_p, self.min_p)

    def verify(self, drafts, n_draft, logits, offset=0, q=None):
        """Speculative verification, each row with its own settings: drafts [n,γ] (the
        first n_draft [n] real), q [n,γ,v] the distributions sampled rows' drafts were
        drawn from (a draft model's), or None for drafts without them (one-hot q),
        logits [n,γ+1,v] at the verified positions. Greedy rows accept the drafts that
        equal the target's argmax; sampled rows follow the rejection rule on their own
        filtered distribution (ops.speculative), so outputs keep the target's
        distribution. offset: as sample's (each round its own keys). (accepted n [n], the
        token after them [n])."""
        g = drafts.shape[1]
        cols = jnp.arange(g)[None]
        real = cols < n_draft[:, None]
        # a padded draft column can never be accepted: -1 is no token
        drafts = jnp.where(real, drafts, -1)
        n_greedy, next_greedy = greedy_accept(drafts, greedy(logits))

        def sampled(_):
            rep = lambda a: jnp.repeat(a, g + 1)  # noqa: E731  (settings per position)
            p = probabilities_rows(logits.reshape(-1, logits.shape[-1]),
                                   rep(self.temperature), rep(self.top_k), rep(self.top_p),
                                   rep(self.min_p)).reshape(logits.shape)
            one = jax.vmap(lambda k, d, p_, q_: rejection_accept(
                k, d[None], p_[None], None if q is None else q_[None]))
            keys = self.keys(offset)
            n, nxt = one(keys, jnp.maximum(drafts, 0), p, p[:, :g] if q is None else q)
            n = jnp.minimum(n[:, 0], n_draft)   # columns past n_draft were rejected
            # a row cut short draws its next token from p at n (the rule's bonus draw)
            at_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
            bonus = jax.vmap(lambda k, q: jax.random.categorical(
                jax.random.fold_in(k, 1), jnp.log(q)))(keys, at_n)
            return n, jnp.where(n < n_draft, nxt[:, 0], bonus.astype(jnp.int32))
        hot = self.temperature > 0
        n_s, next_s = jax.lax.cond(jnp.any(hot), sampled,
                                   lambda _: (n_greedy, next_greedy), None)
        return jnp.where(hot, n_s, n_greedy), jnp.where(hot, next_s, next_greedy)


def peft_inputs(ids):
    return None if ids is None else PeftInputs(ids=ids[None])


def pool_sharding(mesh, buf):
    """A page pool [P,z,k,d] (or its int8 scales [P,z,k,1]) over a mesh: kv heads over
    'tensor' where they split, everything else whole on every device."""
    return activation_sharding(mesh, [None, None, "kv_heads", None], buf.shape,
                               what="KV page pool")


def pinned(graphs, pools):
    """The pools where they were placed (and donated): under a mesh, XLA could otherwise
    hand them back with another layout, which the next call would compile again for."""
    if graphs.mesh is None:
        return pools
    return jax.tree.map(lambda b: jax.lax.with_sharding_constraint(
        b, pool_sharding(graphs.mesh, b)), pools)


def put(buf, vals, keep, starts):
    """buf [n, W] with vals [n, w] written at columns starts.. where keep [n, w]."""
    def one(row, v, k, s):
        old = jax.lax.dynamic_slice(row, (s,), v.shape)
        return jax.lax.dynamic_update_slice(row, jnp.where(k, v, old), (s,))
    return jax.vmap(one)(buf, vals, keep, starts)
