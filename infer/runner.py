"""The runner: what executes the scheduler's plans (vLLM's model runner to its scheduler).

The scheduler (infer/scheduler.py) only decides: which rows run, which pages they get,
what each row feeds. It writes that down as a plan — steps.MixedInputs (a mixed
prefill/decode step), steps.DecodeInputs (K decode steps) or spec_rows.SpecInputs (K
speculative rounds) — and the runner executes it. The runner owns the weights (laid out
over the mesh by the logical-axis rules), the page pools (and the draft source's: a draft
model's or MTP modules'), and the compiled programs; it knows nothing about requests.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np

from jaxlm.model.cache import paged_buffers
from jaxlm.model.memory import kv_bytes_per_token
from jaxlm.ops.paged import paged_write

from .forward import split_model
from .speculative import Speculative
from .steps import SpecProgram, compiled, pool_sharding


@jax.jit
def _write_slots(pools, values, slots):
    """Write values (per layer, per buffer [T, ...]) at flat slots [T] of the pools."""
    return tuple(tuple(paged_write(buf, v, slots) for buf, v in zip(layer, vals))
                 for layer, vals in zip(pools, values))


def aux_bytes(spec: Speculative | None, cfg, dtype) -> int:
    """Bytes a token takes in the draft source's pools (0 without any)."""
    if spec is None or spec.source not in ("draft", "mtp"):
        return 0
    if spec.source == "draft":
        return kv_bytes_per_token(spec.draft.cfg, dtype=dtype.name)
    return kv_bytes_per_token(cfg, dtype=dtype.name) // cfg.n_layers * spec.n_draft


class Runner:
    """Weights, page pools and programs of one model (see the module docstring).

    lm: the model as served (adapters stacked or merged); n_pages pages of page_size
    slots in dtype; mesh, keep_quantized as the Scheduler's; spec: its Speculative."""

    def __init__(self, lm, n_pages: int, page_size: int, dtype, mesh=None,
                 keep_quantized: bool | None = None, spec: Speculative | None = None):
        self.cfg, self.mesh, self.keep_quantized, self.spec = lm.cfg, mesh, keep_quantized, spec
        self.graphs, self.weights = split_model(lm, mesh, keep_quantized)
        self.program = self.aux_weights = None
        if spec is not None:     # a draft model is laid out over the mesh, as the target
            dgraphs = None
            if spec.source == "draft":
                dgraphs, self.aux_weights = split_model(spec.draft, mesh, keep_quantized)
            self.program = SpecProgram(spec.source, spec.n_draft, spec.ngram, dgraphs)
        pools = tuple(paged_buffers(lm.cfg, n_pages, page_size, dtype)
                      for _ in range(lm.cfg.n_layers))
        # placed (committed) from the start, as every call's donated output is: an
        # uncommitted first input would be one more program for the first call
        self.pools = self._place(pools)
        self.aux_pools = self._place(self._aux_pools(n_pages, page_size, dtype))

    def _aux_pools(self, n_pages: int, page_size: int, dtype) -> tuple:
        """The draft source's page pools (same pages, same block tables as the target's):
        one per draft-model layer, or a one-layer pool per MTP module in use."""
        src = None if self.program is None else self.program.source
        if src not in ("draft", "mtp"):
            return ()
        cfg, n = ((self.program.dgraphs.cfg, self.program.dgraphs.cfg.n_layers)
                  if src == "draft" else (self.cfg, self.spec.n_draft))
        return tuple(paged_buffers(cfg, n_pages, page_size, dtype) for _ in range(n))

    def _place(self, tree):
        return jax.tree.map(lambda b: jax.device_put(
            b, jax.devices()[0] if self.mesh is None else pool_sharding(self.mesh, b)), tree)

    def on_mesh(self):
        """The mesh in context while tracing, so MoE layers run expert-parallel."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def write(self, values, slots) -> None:
        """values (per layer, per buffer [T, ...]) into the target's pools at flat slots
        [T] (a prefix adapter's virtual K/V)."""
        self.pools = self._place(_write_slots(self.pools, values, np.asarray(slots, np.int32)))

    def swap_weights(self, lm, same_program: bool) -> None:
        """Serve lm's weights from now on (the adapter stack changed). same_program: refuse,
        in one line, weights that would need another program."""
        graphs, weights = split_model(lm, self.mesh, self.keep_quantized)
        shapes = lambda w: jax.tree.map(lambda x: (x.shape, x.dtype), w)  # noqa: E731
        if same_program and (graphs != self.graphs or
                             shapes(weights) != shapes(self.weights)):
            raise ValueError("the adapter does not fit the served adapter stack (it adds "
                             "modules or an adapter kind the stack lacks) and would need "
                             "a new program; start with its modules in lora_targets "
                             "(--lora-targets)")
        self.graphs, self.weights = graphs, weights

    def run(self, plan, steps: int = 0):
        """Execute one plan: a MixedInputs (steps 0) → (tokens [n], and with speculation
        the rows' next drafts [n,γ], else None); a DecodeInputs → tokens [K, n]; a
        SpecInputs → spec_rows.speculate's outputs. As numpy; the pools updated."""
        with self.on_mesh():
            if self.program is None:
                out, self.pools = compiled(self.graphs, steps)(self.weights, self.pools, plan)
                return np.asarray(out) if steps else (np.asarray(out), None)
            out, self.pools, self.aux_pools = compiled(self.graphs, steps, self.program)(
                self.weights, self.pools, plan, self.aux_weights, self.aux_pools)
        return jax.tree.map(np.asarray, out)

    def ready(self) -> None:
        jax.block_until_ready((self.pools, self.aux_pools))
