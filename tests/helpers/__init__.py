"""Helpers shared by the test modules (and the scripts they start): tiny models with
numpy-drawn weights, adapted copies of them, and a driver for the paged scheduler.
Test modules import these instead of each other."""
import jax
import numpy as np
from flax import nnx

from jaxlm.model import Config, abstract_model
from jaxlm.model import peft as P


def tiny_lm(cfg: Config, seed: int = 0):
    """A CausalLM with numpy-drawn weights (no per-shape jax.random compiles)."""
    graph, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    cpu = jax.devices()[0]
    state = jax.tree.map(lambda x: jax.device_put(rng.normal(0, cfg.init_std, x.shape)
                                                  .astype(x.dtype), cpu), state)
    return nnx.merge(graph, state)


def adapted_lm(base, spec, seed: int, std: float = 0.2):
    """base (its very Variables) with `spec` attached and every adapter weight random, as
    a trained adapter would be (LoRA B ≠ 0, bottleneck up ≠ 0)."""
    shapes = nnx.eval_shape(lambda: P.attach(nnx.merge(*nnx.split(base)), spec))
    graph, state = nnx.split(shapes)
    known = dict(nnx.to_flat_state(nnx.state(base)))
    rng = np.random.default_rng(seed)
    cpu = jax.devices()[0]

    def fill(path, var):
        if isinstance(var, P.Adapter):
            return var.replace(jax.device_put(rng.normal(0, std, var.shape).astype(var.dtype),
                                              cpu))
        return known[path]
    return nnx.merge(graph, nnx.from_flat_state([(p, fill(p, v))
                                                 for p, v in nnx.to_flat_state(state)]))


def drive(sched, arrivals, cancel_at=None, max_steps=2000):
    """Submit each (step, Request) at its arrival step and run the scheduler until it has
    no work; cancel_at {step: request id}. Returns {id: tokens}."""
    out = {r.id: [] for _, r in arrivals}
    pending, step = sorted(arrivals, key=lambda a: a[0]), 0
    while pending or sched.has_work:
        while pending and pending[0][0] <= step:
            sched.submit(pending.pop(0)[1])
        for e in sched.step():
            out[e.id] += e.tokens
        if cancel_at and step in cancel_at:
            sched.cancel(cancel_at[step])
        step += 1
        assert step < max_steps, "the scheduler made no progress"
    return out
