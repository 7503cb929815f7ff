"""The adapters a paged scheduler serves, in a fixed number of slots, so adapters can be
added and removed while serving without compiling again (vLLM's --max-loras).

    slots = AdapterSlots(base, ["peft_a", "peft_b"], capacity=4)
    lm, served = slots.build()            # base + every slot's adapter, stacked
    new_id = slots.add("peft_c")          # into a free slot; build() again, swap weights
    slots.remove(new_id)

Every slot holds an adapted model over the same base; a free slot holds a "ghost": a LoRA
of the stack's rank on the stack's targets with B = 0 (it adds nothing), and with room
to spare one more ghost stands last; its rank and modules are the largest and the union
of the given LoRAs' (unless set). The stacked model (jaxlm.model.peft.attach_stacked, each
adapter's scale folded into its B) then has the same graph and shapes whatever the slots
hold, as long as every adapter fits the stack: its LoRA targets among the stack's and its
rank at most the stack's (the scheduler checks that the program and the weights' shapes
are unchanged and refuses, in one line, an adapter that does not fit). Adapter ids
are never reused, so pages keyed under a removed adapter are never matched again.
"""
from __future__ import annotations

import os

from flax import nnx

from jaxlm.model import peft as P
from jaxlm.model.transformer import CausalLM

from .adapters import Served, _load, prepare

GHOST_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterSlots:
    """capacity slots (default: as many as adapters); rank / targets: the stack's LoRA
    rank and modules (default: the largest rank and the union of the given LoRAs', else
    16 on q/k/v/o); the rest as infer.adapters.prepare."""

    def __init__(self, base: CausalLM, adapters, capacity: int | None, dtype, slot_axis: int,
                 where=None, rank: int | None = None, targets=None):
        adapters = list(adapters or [])
        capacity = len(adapters) if capacity is None else capacity
        if not isinstance(capacity, int) or capacity < max(1, len(adapters)):
            raise ValueError(f"max_adapters ({capacity}) must be >= 1 and hold the "
                             f"{len(adapters)} adapters given")
        self.base, self.dtype, self.slot_axis, self.where = base, dtype, slot_axis, where
        loaded = [_load(base, a, i) for i, a in enumerate(adapters)]
        specs = [m.peft_spec for m in loaded if isinstance(m.peft_spec, P.LoraSpec)]
        self.rank = max([rank or (0 if specs else 16), *(s.r for s in specs)])
        self.specs, self.targets = specs, targets
        self.slots: list[CausalLM | None] = loaded + [None] * (capacity - len(loaded))
        self.dynamic = capacity > len(loaded)     # room to load adapters while serving
        self.ids = {i: i for i in range(len(loaded))}      # adapter id → slot
        self.next_id = len(loaded)
        self._ghost = None

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def slot(self, adapter_id: int) -> int:
        return self.ids[adapter_id]

    def ghost(self) -> CausalLM:
        """The base with a zero LoRA of the stack's rank on its targets (B = 0)."""
        if self._ghost is None:
            spec = P.LoraSpec(r=self.rank, alpha=float(self.rank),
                              targets=self.targets or _union(self.specs))
            self._ghost = P.attach(nnx.merge(*nnx.split(self.base)), spec)
        return self._ghost

    def build(self) -> tuple[CausalLM, Served]:
        """The stacked model over every slot, and its Served (indexed by slot). With room
        for more adapters than were given, one more ghost stands last, addressed by no
        request: it keeps the stack's rank and modules whatever the slots come to hold
        (without it, filling the last free slot could shrink a module's rank)."""
        filled = [m if m is not None else self.ghost() for m in self.slots]
        keeper = [self.ghost()] if self.dynamic else []
        return prepare(self.base, filled + keeper, False, self.dtype, self.slot_axis,
                       self.where, stack_all=True)

    def add(self, adapter) -> int:
        """Put an adapted model or a PEFT directory into a free slot; its new id."""
        if None not in self.slots:
            raise ValueError(f"all {self.capacity} adapter slots are in use; unload one, or "
                             f"start with more (--max-loras)")
        model = _load(self.base, os.fspath(adapter) if isinstance(adapter, os.PathLike)
                      else adapter, self.next_id)
        if model.cfg != self.base.cfg or not P.adapters_of(model):
            raise ValueError("the adapter must be an adapted model of this base (or a PEFT "
                             "directory made for it)")
        spec = model.peft_spec
        if isinstance(spec, P.LoraSpec) and spec.r > self.rank:
            raise ValueError(f"the adapter's LoRA rank {spec.r} exceeds the served stack's "
                             f"{self.rank}; start with a larger --max-lora-rank")
        adapter_id, self.next_id = self.next_id, self.next_id + 1
        free = self.slots.index(None)
        self.slots[free] = model
        self.ids[adapter_id] = free
        return adapter_id

    def remove(self, adapter_id: int) -> None:
        self.slots[self.ids.pop(adapter_id)] = None


def _union(specs) -> tuple[str, ...] | str:
    """The module names every given LoRA targets together (a free slot's zero LoRA sits
    on all of them, so the stack keeps its shape); q/k/v/o without LoRAs."""
    if any(isinstance(s.targets, str) for s in specs):
        regexes = {s.targets for s in specs if isinstance(s.targets, str)}
        if len(regexes) == 1 and all(isinstance(s.targets, str) for s in specs):
            return regexes.pop()
        raise ValueError("LoRA adapters with regex targets mixed with others: name the "
                         "stack's modules with lora_targets (--lora-targets)")
    return tuple(sorted({t for s in specs for t in s.targets})) or GHOST_TARGETS
