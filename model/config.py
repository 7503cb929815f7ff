"""The one frozen model Config, validated at construction, and presets of real families."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxlm.ops.activations import ACTIVATIONS
from jaxlm.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from jaxlm.ops.ring import VARIANTS as CONTEXT_PARALLEL
from jaxlm.ops.moe import DISPATCHES, ROUTERS
from jaxlm.ops.norms import NORMS
from jaxlm.ops.positional import POSITIONS
from jaxlm.ops.rope import LAYOUTS, RopeScaling, yarn_mscale

# Choices that are the model's own (the ops-level ones above come from the ops that
# implement them, so a new kernel or router is added in one place).
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
ATTENTION_KINDS = ("gqa", "mla")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What makes one layer differ from another of the same model."""
    moe: bool                # MoE feed-forward instead of the dense MLP
    window: int | None       # sliding attention window; None = full causal attention


@dataclasses.dataclass(frozen=True)
class Config:
    """Every architectural choice of a decoder LM. Fields left None are derived.

    Defaults describe a small Llama-style model (RMSNorm, SwiGLU, RoPE, GQA-capable).
    """
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None          # None → n_heads (MHA); 1 → MQA
    head_dim: int | None = None            # None → d_model // n_heads
    ffn_dim: int = 768
    activation: str = "silu"
    gated_mlp: bool = True                 # SwiGLU/GeGLU (act(gate)·up) vs act(up)
    norm: str = "rms"
    norm_eps: float = 1e-6
    post_norm: bool = False                # x = norm(x + f(x)) instead of x + f(norm(x))
    position: str = "rope"
    max_position: int = 2048               # learned/sinusoidal table size; cache default
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_layout: str = "half"              # "half" (Llama/NeoX) or "interleaved" (GPT-J)
    rotary_fraction: float = 1.0           # partial rotary: share of head_dim that rotates
    qk_norm: bool = False                  # RMSNorm on each q/k head before RoPE (Qwen3)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None      # keys within the last w positions (Mistral)
    sliding_layers: tuple[int, ...] | None = None  # layers that slide; None → all (Qwen2)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None        # None → head_dim ** -0.5
    dtype: str = "float32"                 # compute dtype
    param_dtype: str = "float32"           # storage dtype of the parameters
    init_std: float = 0.02
    attention_impl: str = "xla"
    remat: str = "none"                    # activation rematerialisation per block
    context_parallel: str = "ring"         # under a 'sequence' mesh axis: "ring" or "allgather"
    # Multi-head latent attention (DeepSeek-V2/V3) --------------------------------
    attention: str = "gqa"                 # "gqa" (MHA/GQA/MQA) or "mla"
    q_lora_rank: int | None = None         # low-rank query; None → full q projection
    kv_lora_rank: int = 64                 # compressed KV latent width (what the cache holds)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16             # decoupled RoPE key shared by all heads
    v_head_dim: int = 32
    mla_absorb: bool = False               # attend over the latent with folded up-projections
    # Mixture of experts -----------------------------------------------------------
    n_experts: int = 0                     # 0 → every layer is a dense MLP
    n_experts_per_tok: int = 2
    moe_ffn_dim: int | None = None         # None → ffn_dim
    n_shared_experts: int = 0              # DeepSeek: shared MLP of n × moe_ffn_dim
    shared_ffn_dim: int | None = None      # Qwen2-MoE: explicit shared-expert width
    shared_expert_gate: bool = False       # Qwen2-MoE: sigmoid gate on the shared expert
    router: str = "softmax"                # "softmax" (Mixtral/Qwen) or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True            # renormalise the chosen k weights
    routed_scaling_factor: float = 1.0
    n_group: int = 1                       # group-limited routing (DeepSeek-V3)
    topk_group: int = 1
    first_k_dense: int = 0                 # the first k layers stay dense (DeepSeek)
    moe_every: int = 1                     # layer i is MoE when (i + 1) % moe_every == 0 (Qwen)
    mlp_only_layers: tuple[int, ...] = ()  # layers kept dense whatever the above say (Qwen)
    moe_dispatch: str = "dropless"         # "dropless" (ragged_dot), "capacity", "dense"
    capacity_factor: float = 1.25
    # Extra prediction heads (speculative decoding's self-drafting) ------------------
    mtp_depth: int = 0                     # DeepSeek-V3 multi-token prediction modules (D)
    medusa_heads: int = 0                  # Medusa heads on the final hidden state (K)
    # Weight-only quantization (jaxlm.model.quant) --------------------------------------
    weight_quant: str | None = None        # None (float), "int8" (per channel), "int4" (groups)
    quant_group: int = 64                  # int4: contraction rows sharing one scale

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"Config.{field}: {why}")

        for f in ("sliding_layers", "mlp_only_layers"):  # JSON gives lists; keep it hashable
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, tuple(sorted(set(v))))
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_position"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, f"must be a positive int, got {getattr(self, f)!r}")
        kv = self.num_kv_heads
        if kv < 1 or self.n_heads % kv:
            bad("n_kv_heads", f"{kv} must divide n_heads={self.n_heads} "
                              f"(1 = MQA, n_heads = MHA)")
        if self.head_dim is None and self.d_model % self.n_heads:
            bad("head_dim", f"d_model={self.d_model} is not divisible by n_heads="
                            f"{self.n_heads}; set head_dim explicitly")
        choices = {"activation": tuple(ACTIVATIONS), "norm": NORMS, "position": POSITIONS,
                   "rope_layout": LAYOUTS, "dtype": DTYPES, "param_dtype": DTYPES,
                   "remat": REMAT, "attention_impl": ATTENTION_IMPLS,
                   "context_parallel": CONTEXT_PARALLEL,
                   "attention": ATTENTION_KINDS, "router": ROUTERS, "moe_dispatch": DISPATCHES}
        for f, allowed in choices.items():
            if getattr(self, f) not in allowed:
                bad(f, f"{getattr(self, f)!r} is not one of {allowed}")
        if self.weight_quant not in (None, "int8", "int4"):
            bad("weight_quant", f"{self.weight_quant!r} is not one of None, 'int8', 'int4'")
        if not isinstance(self.quant_group, int) or self.quant_group < 2 or self.quant_group % 2:
            bad("quant_group", f"must be an even int >= 2, got {self.quant_group!r}")
        if not 0 < self.rotary_fraction <= 1:
            bad("rotary_fraction", f"must be in (0, 1], got {self.rotary_fraction}")
        if self.position == "rope" and self.rotary_dim % 2:
            bad("rotary_fraction", f"rotary dim {self.rotary_dim} (head_dim × fraction) "
                                   f"must be even")
        if self.position == "sinusoidal" and self.d_model % 2:
            bad("d_model", "sinusoidal positions need an even d_model")
        if self.sliding_window is not None and self.sliding_window < 1:
            bad("sliding_window", f"must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_layers is not None and self.sliding_window is None:
            bad("sliding_layers", "needs sliding_window (the window those layers use)")
        for f in ("sliding_layers", "mlp_only_layers"):
            outside = [i for i in getattr(self, f) or () if not (isinstance(i, int)
                                                                and 0 <= i < self.n_layers)]
            if outside:
                bad(f, f"layer indices {outside} are not in [0, n_layers={self.n_layers})")
        for f in ("attn_softcap", "final_softcap", "norm_eps", "init_std", "rope_theta"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                bad(f, f"must be > 0, got {v}")
        if self.attention == "mla":
            for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, f) < 1:
                    bad(f, f"must be >= 1 for MLA, got {getattr(self, f)}")
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
            if self.position != "rope":
                bad("position", "MLA needs position='rope' (its decoupled key is rotary)")
        if self.n_experts:
            if not 1 <= self.n_experts_per_tok <= self.n_experts:
                bad("n_experts_per_tok", f"must be in [1, n_experts={self.n_experts}], "
                                         f"got {self.n_experts_per_tok}")
            if self.n_experts % self.n_group:
                bad("n_group", f"{self.n_group} must divide n_experts={self.n_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.moe_every < 1:
                bad("moe_every", f"must be >= 1, got {self.moe_every}")
            if self.capacity_factor <= 0:
                bad("capacity_factor", f"must be > 0, got {self.capacity_factor}")
        for f in ("mtp_depth", "medusa_heads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                bad(f, f"must be an int >= 0 (0 = none), got {getattr(self, f)!r}")
        if isinstance(self.rope_scaling, dict):  # accept the serialised form
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # Derived sizes -------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.dim_per_head * self.rotary_fraction)

    @property
    def softmax_scale(self) -> float:
        """The attention logit scale: attn_scale if set, else 1/sqrt(q·k dim).

        MLA with YaRN also multiplies by mscale(factor, mscale_all_dim)², as DeepSeek does."""
        if self.attn_scale is not None:
            return self.attn_scale
        if self.attention != "mla":
            return self.dim_per_head ** -0.5
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        sc = self.rope_scaling
        if sc is not None and sc.kind != "default" and sc.mscale_all_dim:
            scale *= yarn_mscale(sc.factor, sc.mscale_all_dim) ** 2
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (bool(self.n_experts) and i >= self.first_k_dense
                and (i + 1) % self.moe_every == 0 and i not in self.mlp_only_layers)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i's attention (None: it sees every earlier key)."""
        if self.sliding_layers is not None and i not in self.sliding_layers:
            return None
        return self.sliding_window

    def layer_kind(self, i: int) -> "LayerKind":
        return LayerKind(moe=self.is_moe_layer(i), window=self.layer_window(i))

    def layer_groups(self) -> list[tuple["LayerKind", int]]:
        """Runs of consecutive identical layers as (kind, count); each run is one scan, so
        any pattern of dense/MoE and sliding/full layers is a grouping."""
        groups: list[tuple[LayerKind, int]] = []
        for i in range(self.n_layers):
            kind = self.layer_kind(i)
            if groups and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1] + 1)
            else:
                groups.append((kind, 1))
        return groups

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    # Serialisation (checkpoints store the config as JSON) ----------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Config: unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def _llama3_scaling(factor=8.0, original=8192):
    return RopeScaling(kind="llama3", factor=factor, original_max_position=original,
                       low_freq_factor=1.0, high_freq_factor=4.0)


# Shapes of real families (random init; load real weights with from_hf).
# The CPU presets recompute each block in the backward pass (remat="full"): on a CPU,
# storing and stacking every block's activations for the scanned backward costs more
# than recomputing them (tiny, batch 16 × 128: 334 → 272 ms per step, 2026-12-02).
PRESETS: dict[str, Config] = {
    "tiny": Config(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                   ffn_dim=768, max_position=1024, remat="full"),
    "small": Config(vocab_size=256, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                    ffn_dim=1408, max_position=2048, remat="full"),
    "llama3-1b": Config(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                        n_kv_heads=8, head_dim=64, ffn_dim=8192, norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
                        max_position=131072, tie_embeddings=True, dtype="bfloat16"),
    "llama3-8b": Config(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=_llama3_scaling(8.0), max_position=131072,
                        dtype="bfloat16"),
    "llama3-70b": Config(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                         n_kv_heads=8, ffn_dim=28672, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_llama3_scaling(8.0), max_position=131072,
                         dtype="bfloat16"),
    "mistral-7b": Config(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                         n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5, sliding_window=4096,
                         max_position=32768, dtype="bfloat16"),
    "qwen2-0.5b": Config(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, ffn_dim=4864, qkv_bias=True, rope_theta=1000000.0,
                         tie_embeddings=True, max_position=32768, dtype="bfloat16"),
    "qwen3-0.6b": Config(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
                         n_kv_heads=8, head_dim=128, ffn_dim=3072, qk_norm=True,
                         rope_theta=1000000.0, tie_embeddings=True, max_position=40960,
                         dtype="bfloat16"),
    "mixtral-8x7b": Config(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                           n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5, rope_theta=1e6,
                           n_experts=8, n_experts_per_tok=2, max_position=32768,
                           dtype="bfloat16"),
    "qwen3-30b-a3b": Config(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32,
                            n_kv_heads=4, head_dim=128, ffn_dim=6144, moe_ffn_dim=768,
                            qk_norm=True, rope_theta=1e6, n_experts=128, n_experts_per_tok=8,
                            max_position=40960, dtype="bfloat16"),
    "deepseek-v3": Config(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128,
                          ffn_dim=18432, moe_ffn_dim=2048, attention="mla", q_lora_rank=1536,
                          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                          v_head_dim=128, rope_layout="interleaved",
                          rope_scaling=RopeScaling(kind="yarn", factor=40.0,
                                                   original_max_position=4096, mscale=1.0,
                                                   mscale_all_dim=1.0),
                          n_experts=256, n_experts_per_tok=8, n_shared_experts=1,
                          router="sigmoid", routed_scaling_factor=2.5, n_group=8,
                          topk_group=4, first_k_dense=3, max_position=163840,
                          dtype="bfloat16"),
    "deepseek-v3-small": Config(vocab_size=256, d_model=256, n_layers=4, n_heads=4,
                                ffn_dim=512, moe_ffn_dim=128, attention="mla",
                                q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                                qk_rope_head_dim=16, v_head_dim=32, rope_layout="interleaved",
                                n_experts=8, n_experts_per_tok=2, n_shared_experts=1,
                                router="sigmoid", routed_scaling_factor=2.5, n_group=4,
                                topk_group=2, first_k_dense=1, max_position=2048),
    "gpt2": Config(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, ffn_dim=3072,
                   activation="gelu_tanh", gated_mlp=False, norm="layer", norm_eps=1e-5,
                   position="learned", max_position=1024, qkv_bias=True, out_bias=True,
                   mlp_bias=True, tie_embeddings=True),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
