"""Weight-only quantization of a CausalLM: every linear weight to int8 (per output channel)
or int4 (groups along the contraction), the maths in jaxlm.ops.quant.

    qlm = quantize(lm, "int8")             # a new model; lm is left as it was
    qlm = quantize(lm, "int4", group=64)

What is quantized: the attention projections (q/k/v/o, MLA's q_a/q_b/kv_a/kv_b), the MLP,
the MoE experts and shared experts, the untied LM head and the MTP / Medusa heads' linear
weights. What stays float: embeddings (a decode step gathers b rows of the table, so they
cost no bandwidth worth saving), norms, biases, the MoE router (routing decisions are
discrete and sensitive) and adapters (LoRA on a quantized base is QLoRA's layout).

A quantized weight is a `QuantizedParam` in the place of the float Param: its arrays are
`QWeight` variables (not Params: no optimizer updates them; orbax saves them with the
model's other non-parameter variables), and reading it whole (`w[...]`) gives the float
weight back, so code that reads weights (MoE experts, MLA's absorbed kv_b, LoRA's shapes)
works unchanged, while Dense multiplies by the quantized form directly.

The Config records the quantization (`weight_quant`, `quant_group`), so a saved quantized
model is rebuilt from its config in quantized form and loaded without re-quantizing.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.ops import quant as q_ops

from .peft import _names


class QWeight(nnx.Variable):
    """A quantized weight's integer values or scales: saved and sharded like a parameter,
    never trained."""


class QuantizedParam(nnx.Module):
    """A weight [lead..., in..., out...] stored quantized. `n_in`/`n_out` count the
    contraction and output axes of one weight; any axes before them (a scanned stack's
    layers, a MoE layer's experts) are leading axes, each handled by vmap, so one layer's
    slice (inside the scan or the engine) is the same object with fewer leading axes."""

    def __init__(self, w, names, n_in: int, n_out: int, mode: str, group: int, dtype):
        if mode not in q_ops.MODES:
            raise ValueError(f"weight quantization {mode!r} is not one of {q_ops.MODES}")
        self.mode, self.group, self.n_in, self.n_out = mode, group, n_in, n_out
        lead = w.ndim - n_in - n_out
        self.in_shape = tuple(w.shape[lead:lead + n_in])
        if mode == "int4":
            q_ops.check_int4(math.prod(self.in_shape), group, f"a weight of shape {w.shape}")
        values, scale = _quantize(w, mode, n_in, group, lead, jnp.dtype(dtype).name)
        lead_names, in_names, out_names = (names[:lead], names[lead:lead + n_in],
                                           names[lead + n_in:])
        v_names = names if mode == "int8" else (*lead_names, in_names[0], *out_names)
        s_names = (*lead_names, *out_names) if mode == "int8" else v_names
        self.values = QWeight(values, sharding_names=v_names, eager_sharding=False)
        self.scale = QWeight(scale, sharding_names=s_names, eager_sharding=False)
        self.names = tuple(names)  # the float weight's, for code that reads them (LoRA)

    @property
    def lead(self) -> int:
        return self.values[...].ndim - (self.n_in if self.mode == "int8" else 1) - self.n_out

    @property
    def shape(self) -> tuple:
        v = self.values[...]
        lead = v.shape[:self.lead]
        return (*lead, *self.in_shape, *v.shape[self.lead + (self.n_in if self.mode == "int8"
                                                             else 1):])

    def dequantize(self, dtype=jnp.float32):
        """The float weight [lead..., in..., out...]."""
        mode, group, in_shape = self.mode, self.group, self.in_shape

        def one(values, scale):
            if mode == "int8":
                return q_ops.dequantize_int8(values, scale, dtype)
            w = q_ops.dequantize_int4(values, scale, group, dtype)
            return w.reshape(*in_shape, *w.shape[1:])
        return _over_lead(one, self.lead)(self.values[...], self.scale[...])

    def __getitem__(self, idx):
        return self.dequantize()[idx]

    def get_metadata(self):
        return {"out_sharding": self.names}

    def set_value(self, value):
        raise ValueError("quantized weights are read-only (merging a LoRA into one would "
                         "need re-quantizing); serve the adapter unmerged, or merge it into "
                         "the float model before quantizing")

    def matmul(self, x):
        """x [..., in...] · W → [..., out...] for one weight (no leading axes)."""
        if self.lead:
            raise ValueError("matmul needs one weight; slice the leading axes first")
        if self.mode == "int8":
            return q_ops.int8_matmul(x, self.values[...], self.scale[...], self.n_in)
        return q_ops.int4_matmul(x, self.values[...], self.scale[...], self.group, self.n_in)

    @property
    def nbytes(self) -> int:
        return self.values[...].nbytes + self.scale[...].nbytes


def _over_lead(fn, lead: int):
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize(w, mode: str, n_in: int, group: int, lead: int, scale_dtype: str):
    def one(w):
        if mode == "int8":
            return q_ops.quantize_int8(w, n_in, scale_dtype)
        return q_ops.quantize_int4(w, n_in, group, scale_dtype)
    return _over_lead(one, lead)(w)


# Which weights of which modules, and their (n_in, n_out) -------------------------------
def _targets(module):
    """(attribute name, n_in, n_out) of the weights this module holds that get quantized."""
    from .layers import Dense
    from .moe import MoE
    if isinstance(module, Dense):
        w = module.kernel
        if isinstance(w, QuantizedParam):
            return []
        lead = 1 if _names(w)[:1] == ("layers",) else 0   # a scanned stack's layer axis
        return [("kernel", module.in_rank, w[...].ndim - module.in_rank - lead)]
    if isinstance(module, MoE):
        return [(name, 1, 1) for name in ("gate", "up", "down", "shared_gate_proj",
                                          "shared_up", "shared_down")
                if getattr(module, name) is not None]
    return []


def quantize_in_place(lm, mode: str, group: int) -> None:
    """Replace every target weight of lm by its QuantizedParam (used by CausalLM itself
    when its Config asks for quantized weights, and by `quantize`)."""
    dtype = lm.cfg.dtype
    for _, module in list(nnx.iter_modules(lm)):
        for name, n_in, n_out in _targets(module):
            w = getattr(module, name)
            if isinstance(w, QuantizedParam):
                continue
            setattr(module, name, QuantizedParam(w[...], _names(w), n_in, n_out, mode,
                                                 group, dtype))


def quantize(lm, mode: str, group: int = 64):
    """A copy of lm with its linear weights quantized (see the module docstring); lm keeps
    its float weights. An unmerged LoRA lm carries stays float on top of the quantized base
    (QLoRA's layout); a merged one is in the weights that get quantized, and the copy drops
    its adapter modules."""
    from .peft import _module, adapters_of, loras
    if lm.cfg.weight_quant is not None:
        raise ValueError(f"the model is already quantized ({lm.cfg.weight_quant}); quantize "
                         f"the float model instead")
    cfg = lm.cfg.replace(weight_quant=mode, quant_group=group)   # validates mode and group
    out = nnx.merge(*nnx.split(lm))     # new modules over the same arrays; lm untouched
    out.cfg = cfg
    for path, lora in loras(out):
        if lora.merged:
            setattr(_module(out, path[:-1]), path[-1], None)
    if not adapters_of(out):
        out.peft_spec = None
    quantize_in_place(out, mode, group)
    return out


def weight_bytes(lm) -> dict:
    """Bytes of the model's weights: {'quantized', 'float_equivalent' (those weights in
    float32), 'other' (everything else: embeddings, norms, adapters), 'total'}."""
    quantized = float_equiv = 0
    for _, m in nnx.iter_modules(lm):
        if isinstance(m, QuantizedParam):
            quantized += m.nbytes
            float_equiv += 4 * math.prod(m.shape)
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm)))
    return {"quantized": quantized, "float_equivalent": float_equiv,
            "other": total - quantized, "total": total}
