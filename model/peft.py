"""Adapters on a CausalLM: LoRA, prefix tuning and bottleneck adapters.

    spec = parse_spec("lora:r=8,alpha=16,targets=q_proj,v_proj")
    attach(lm, spec, seed=0)     # lm gains adapter modules; its base weights are untouched
    merge(lm) / unmerge(lm)      # fold LoRA into the base weights (single-adapter speed)

Adapter weights are `Adapter` variables (an nnx.Param subclass), so
`SplitModel(lm, trainable=Adapter)` trains them alone while the base stays frozen.

* LoRA sits on a Dense (y = x·W + s·(x·A)·B) chosen by the Hugging Face module names users
  type (q_proj, ..., GPT-2's c_attn/c_proj/c_fc; a list matches a name or a dotted suffix,
  a single string is a regex over the full module name, as in PEFT). GPT-2's fused c_attn
  is one LoRA whose A is shared by q, k and v. MoE experts (and the shared experts) and
  MLA's kv_b, whose kernels are read as weights rather than called, get the same delta
  added to the weight (s·A·B, per expert).
* Prefix tuning adds P virtual tokens whose keys and values every layer's attention sees
  before the real tokens, which sit at positions P.. (as in PEFT, whose prefix is a
  cache of P tokens). Training prepends them in each layer; inference writes them into
  the KV cache once (CausalLM.init_cache), so both see the same prefix.
* Bottleneck adapters (Houlsby: after attention and after the MLP; Pfeiffer: after the
  MLP) add up(act(down(h))) to a sublayer's output h, up zero-initialised.

For serving several adapters in one batch, `attach_stacked` puts every adapter's LoRA
factors (zero-padded to the largest rank) and bottleneck weights on one leading adapter
axis, and each row picks its own with `PeftInputs.ids`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.ops import peft as peft_ops

from .config import Config


class Adapter(nnx.Param):
    """A trainable adapter weight (LoRA factor, prefix, bottleneck projection)."""


@partial(jax.tree_util.register_dataclass, data_fields=["ids", "key"], meta_fields=[])
@dataclasses.dataclass
class PeftInputs:
    """What adapters read at call time. ids [b]: each row's adapter in a stacked set (−1:
    none); key: the dropout key of this call (None: no dropout, e.g. inference)."""
    ids: Any = None
    key: Any = None


# Specs -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")  # names, or one regex string
    dropout: float = 0.0
    rslora: bool = False
    method = "lora"

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora: r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora: targets is empty; name modules, e.g. targets=q_proj,v_proj")

    @property
    def scale(self) -> float:
        return peft_ops.lora_scale(self.r, self.alpha, self.rslora)


@dataclasses.dataclass(frozen=True)
class PrefixSpec:
    tokens: int = 16
    projection: bool = False       # PEFT's prefix_projection: embedding → MLP → keys/values
    hidden: int | None = None      # the MLP's hidden width (PEFT: encoder_hidden_size)
    method = "prefix"

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"prefix: tokens must be >= 1, got {self.tokens}")


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    dim: int = 32
    where: tuple[str, ...] = ("attn", "mlp")   # Houlsby: both; Pfeiffer: ("mlp",)
    activation: str = "relu"
    method = "adapter"

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"adapter: dim must be >= 1, got {self.dim}")
        bad = [w for w in self.where if w not in ("attn", "mlp")]
        if bad or not self.where:
            raise ValueError(f"adapter: where must name attn and/or mlp, got {self.where}")
        if self.activation not in ops.ACTIVATIONS:
            raise ValueError(f"adapter: activation {self.activation!r} is not one of "
                             f"{sorted(ops.ACTIVATIONS)}")


Spec = LoraSpec | PrefixSpec | BottleneckSpec
SPECS = {s.method: s for s in (LoraSpec, PrefixSpec, BottleneckSpec)}
_ALIASES = {"lora": {"rank": "r", "target": "targets", "target_modules": "targets",
                     "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora"},
            "prefix": {"num_virtual_tokens": "tokens", "prefix_projection": "projection",
                       "encoder_hidden_size": "hidden"},
            "adapter": {"style": "style", "size": "dim"}}


def parse_spec(text: str) -> Spec:
    """'lora:r=8,alpha=16,targets=q_proj,v_proj' | 'prefix:tokens=16[,projection=true]' |
    'adapter:dim=32[,style=houlsby|pfeiffer][,activation=relu]'. A comma-separated item
    without '=' continues the previous list (targets). targets=re:REGEX is a regex."""
    method, _, rest = text.partition(":")
    method = method.strip()
    if method not in SPECS:
        raise ValueError(f"--peft {text!r}: unknown method {method!r}; write lora:..., "
                         f"prefix:... or adapter:...")
    fields = {f.name: f for f in dataclasses.fields(SPECS[method])}
    values: dict[str, Any] = {}
    last = None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            if last not in ("targets", "where"):
                raise ValueError(f"--peft {text!r}: {item!r} is not key=value")
            values[last] = (*values[last], item)
            continue
        key = _ALIASES[method].get(key.strip(), key.strip())
        value = value.strip()
        if method == "adapter" and key == "style":
            styles = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
            if value not in styles:
                raise ValueError(f"--peft {text!r}: style must be houlsby or pfeiffer")
            key, value = "where", styles[value]
        elif key not in fields:
            raise ValueError(f"--peft {text!r}: {method} has no setting {key!r}; known: "
                             f"{', '.join(sorted(fields))}")
        values[key] = _coerce(text, key, value, fields[key].type)
        last = key
    if "targets" in values and isinstance(values["targets"], tuple) and \
            len(values["targets"]) == 1 and values["targets"][0].startswith("re:"):
        values["targets"] = values["targets"][0][3:]
    return SPECS[method](**values)


def _coerce(text, key, value, hint):
    if isinstance(value, tuple):
        return value
    hint = str(hint)
    try:
        if hint.startswith("int"):
            return int(value)
        if hint.startswith("float"):
            return float(value)
        if hint.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise ValueError(f"--peft {text!r}: {key}={value!r} is not a {hint.split()[0]}") from None
    if hint.startswith("tuple"):
        return (value,)
    return value


def spec_to_dict(spec: Spec) -> dict:
    d = dataclasses.asdict(spec)
    return {"method": spec.method, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in d.items()}}


def spec_from_dict(d: dict) -> Spec:
    d = dict(d)
    cls = SPECS[d.pop("method")]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Modules -----------------------------------------------------------------------------
class LoRA(nnx.Module):
    """s·(x·A)·B beside a Dense (`stacked`: A [n, *in, r] per adapter, rows pick by id)."""

    def __init__(self, a: Adapter, b: Adapter, scale, dropout: float = 0.0, salt: int = 0,
                 stacked: bool = False):
        self.a, self.b = a, b      # a may be shared with sibling modules (GPT-2's c_attn)
        self.scale = scale         # float, or a tuple of floats (one per stacked adapter)
        self.dropout, self.salt, self.stacked = dropout, salt, stacked
        self.merged = False
        self.enabled = True        # static: False computes the base alone (set_enabled)

    def __call__(self, x, peft: PeftInputs | None):
        if self.merged or not self.enabled:
            return 0
        if self.stacked:
            if peft is None or peft.ids is None:
                raise ValueError("a model with stacked adapters needs PeftInputs(ids=...)")
            return peft_ops.lora_delta_rows(x, self.a[...], self.b[...], self.scale, peft.ids)
        return peft_ops.lora_delta(_dropout(x, self.dropout, peft, self.salt),
                                   self.a[...], self.b[...], self.scale)

    def weight_delta(self, lead: int = 0):
        """s·A·B as a weight (for kernels read as weights: experts, MLA's kv_b)."""
        if self.stacked:
            raise ValueError("stacked (per-row) adapters cannot target weights read as a "
                             "whole (MoE experts, MLA kv_b); serve that adapter alone or merged")
        if self.merged:
            return 0
        return peft_ops.lora_weight_delta(self.a[...], self.b[...], self.scale, lead)


def _dropout(x, rate: float, peft: PeftInputs | None, salt: int):
    if not rate or peft is None or peft.key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(peft.key, salt), 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


class Bottleneck(nnx.Module):
    """h + act(h·D + bd)·U + bu on a sublayer's output h (U, bu zero-initialised)."""

    def __init__(self, down, down_bias, up, up_bias, activation: str, stacked: bool = False):
        self.down, self.down_bias, self.up, self.up_bias = down, down_bias, up, up_bias
        self.activation, self.stacked = activation, stacked
        self.enabled = True

    def __call__(self, h, peft: PeftInputs | None):
        if not self.enabled:
            return h
        args = (self.down[...], self.up[...], self.activation, self.down_bias[...],
                self.up_bias[...])
        if self.stacked:
            return peft_ops.bottleneck_rows(h, *args, peft.ids)
        return peft_ops.bottleneck(h, *args)


class Prefix(nnx.Module):
    """P virtual tokens' keys and values for every layer: kv() → [L, 2, P, kh, hd].
    Without projection the table holds them directly ([P, L·2·kh·hd], PEFT's layout);
    with it, an embedding [P, kh·hd] goes through Linear → tanh → Linear (PEFT's
    PrefixEncoder; only the output is exported, as PEFT saves it)."""

    def __init__(self, cfg: Config, spec: PrefixSpec, rngs: nnx.Rngs):
        kv = cfg.num_kv_heads * cfg.dim_per_head
        out = cfg.n_layers * 2 * kv
        self.enabled = True
        self.shape = (cfg.n_layers, 2, spec.tokens, cfg.num_kv_heads, cfg.dim_per_head)
        normal = lambda *s: jax.random.normal(rngs.params(), s, jnp.float32)  # noqa: E731
        if spec.projection:
            hidden = spec.hidden or kv
            self.embedding = Adapter(normal(spec.tokens, kv))  # nn.Embedding: N(0, 1)
            self.w1 = Adapter(peft_ops.kaiming_uniform(rngs.params(), (kv, hidden), kv))
            self.b1 = Adapter(peft_ops.kaiming_uniform(rngs.params(), (hidden,), kv))
            self.w2 = Adapter(peft_ops.kaiming_uniform(rngs.params(), (hidden, out), hidden))
            self.b2 = Adapter(peft_ops.kaiming_uniform(rngs.params(), (out,), hidden))
        else:
            self.embedding = Adapter(normal(spec.tokens, out))
            self.w1 = self.b1 = self.w2 = self.b2 = None

    def table(self):
        """The [P, L·2·kh·hd] table PEFT saves as `prompt_embeddings`."""
        e = self.embedding[...]
        if self.w1 is None:
            return e
        return jnp.tanh(e @ self.w1[...] + self.b1[...]) @ self.w2[...] + self.b2[...]

    def kv(self, dtype=jnp.float32):
        l2, p, kh, hd = self.shape[0] * 2, self.shape[2], self.shape[3], self.shape[4]
        t = self.table().reshape(p, l2, kh, hd).transpose(1, 0, 2, 3)   # [L·2, P, kh, hd]
        return t.reshape(self.shape).astype(dtype)


# Which modules a name matches (HF module names) ---------------------------------------
@dataclasses.dataclass(frozen=True)
class Site:
    """One place LoRA can go: the HF module name it answers to (per layer, {i}) and the
    jaxlm module(s) it lands on. kind: "dense" (a Dense, or several sharing one A when
    fused), "weight" (a raw weight [*lead, *in, *out] of a MoE layer: expert j, or the
    shared expert), "refuse" (named so the error can say why)."""
    hf: str
    paths: tuple[tuple, ...]          # module paths ("<group>" for the scan group)
    layers: tuple[int, ...] | None    # None: outside the layer stack
    kind: str = "dense"
    expert: int | None = None
    why: str = ""


def sites(cfg: Config, family: str | None = None) -> list[Site]:
    """Every LoRA site of cfg's model, named as its HF family names it."""
    from .io.hf_config import hf_config_from
    from .io.hf_rules import rules_for
    # the family of the model proper: adapters never go on Medusa heads or MTP modules,
    # which most families have no layout for
    family = family or hf_config_from(cfg.replace(medusa_heads=0, mtp_depth=0))["model_type"]
    out = []
    for rule in rules_for(family, cfg):
        if not rule.hf.endswith(".weight") or rule.copy or rule.paths[0][0] == "mtp":
            continue  # adapters go on the model proper, not on DeepSeek's MTP layers
        name = rule.hf[:-len(".weight")]
        last = [p[-1] for p in rule.paths]
        layers = (None if "{i}" not in name else
                  tuple(range(cfg.n_layers)) if rule.layers is None else rule.layers)
        if all(x == "kernel" for x in last):
            kind = "dense"
            if any(p[-2] == "kv_b" for p in rule.paths):
                kind = "dense_weight"  # MLA reads kv_b's kernel as a weight
            out.append(Site(name, tuple(p[:-1] for p in rule.paths), layers, kind))
        elif last[0] in ("gate", "up", "down") and rule.index:
            out.append(Site(name, rule.paths, layers, "weight", expert=rule.index[0]))
        elif last[0] in ("shared_gate_proj", "shared_up", "shared_down"):
            out.append(Site(name, rule.paths, layers, "weight"))
        elif last[0] in ("router",):
            out.append(Site(name, rule.paths, layers, "refuse", why="an MoE router"))
        elif last[0] in ("embedding", "pos_embed"):
            out.append(Site(name, rule.paths, layers, "refuse", why="an embedding table"))
        elif last[0] == "shared_expert_gate":
            out.append(Site(name, rule.paths, layers, "refuse", why="a shared-expert gate"))
    return out


def matches(targets, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list item matches the name
    or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(cfg: Config, targets, family: str | None = None) -> list[Site]:
    """The sites `targets` selects, all of each (every layer, every expert) or an error."""
    chosen = []
    for site in sites(cfg, family):
        names = ([site.hf] if site.layers is None else
                 [site.hf.format(i=i) for i in site.layers])
        hit = [n for n in names if matches(targets, n)]
        if not hit:
            continue
        if site.kind == "refuse":
            raise ValueError(f"LoRA target {hit[0]!r} is {site.why}; jaxlm puts LoRA on "
                             f"linear projections only")
        if len(hit) != len(names):
            raise ValueError(f"LoRA targets {_show(targets)} match {site.hf!r} in some layers "
                             f"only ({len(hit)} of {len(names)}); jaxlm adapts a module in "
                             f"every layer or none")
        chosen.append(site)
    experts = {}
    for s in chosen:
        if s.expert is not None:
            experts.setdefault(s.paths, []).append(s.expert)
    for paths, got in experts.items():
        if len(got) != cfg.n_experts:
            raise ValueError(f"LoRA targets {_show(targets)} match {len(got)} of "
                             f"{cfg.n_experts} experts; adapt all experts or none")
    if not chosen:
        names = sorted({s.hf.rsplit(".", 1)[-1] for s in sites(cfg, family)
                        if s.kind != "refuse"})
        raise ValueError(f"LoRA targets {_show(targets)} match no module of this model; "
                         f"its linear modules are {', '.join(names)}")
    return chosen


def _show(targets) -> str:
    return repr(targets) if isinstance(targets, str) else ",".join(targets)


# Attaching --------------------------------------------------------------------------
def _module(root, path):
    m = root
    for part in path:
        m = m[part] if isinstance(part, int) else getattr(m, part)
    return m


def _group_paths(cfg: Config, path, layers):
    """A site path with "<group>" → one path per scan group holding those layers."""
    from .io.hf_rules import GROUP, layer_slots
    if GROUP not in path:
        return [(path, None)]
    groups = sorted({layer_slots(cfg)[i][0] for i in layers})
    return [(tuple(g if p == GROUP else p for p in path), g) for g in groups]


def _names(var):
    """The logical axis names of a base weight (flax stores `sharding_names=` as
    out_sharding), so its adapter factors shard the same way on a mesh."""
    return tuple(var.get_metadata().get("out_sharding") or (None,) * var[...].ndim)


def attach(lm, spec: Spec, seed: int = 0, family: str | None = None):
    """Add `spec`'s adapter to lm (in place; returns lm), freshly initialised as PEFT does:
    LoRA A Kaiming-uniform and B zero, bottleneck up zero (so the model is unchanged),
    prefix N(0, 1). Adapter weights are `Adapter` variables."""
    if adapters_of(lm):
        raise ValueError("this model already has an adapter; attach one per model (serve "
                         "several with jaxlm.infer.Engine(adapters=...))")
    rngs = nnx.Rngs(seed)
    cfg = lm.cfg
    if isinstance(spec, LoraSpec):
        _attach_lora(lm, spec, rngs, family)
    elif isinstance(spec, PrefixSpec):
        if cfg.attention == "mla":
            raise ValueError("prefix tuning needs per-head keys and values; MLA's cache "
                             "holds a latent instead (use LoRA for MLA models)")
        lm.prefix = Prefix(cfg, spec, rngs)
    else:
        _attach_bottleneck(lm, spec, rngs)
    lm.peft_spec = spec
    return lm


def check_attachable(cfg: Config, spec: Spec) -> None:
    """Raise attach's ValueError (targets matching nothing, a prefix on MLA, ...) for a model
    of this Config without building it: attach runs on shapes alone."""
    from .transformer import CausalLM
    nnx.eval_shape(lambda: attach(CausalLM(cfg, nnx.Rngs(0)), spec))


def _attach_lora(lm, spec: LoraSpec, rngs, family):
    cfg = lm.cfg
    for n, site in enumerate(resolve_targets(cfg, spec.targets, family)):
        if site.kind == "weight" and site.expert not in (None, 0):
            continue  # one LoRA per expert stack, made at expert 0
        for path, g in _group_paths(cfg, site.paths[0], site.layers or ()):
            paths = [p for q in site.paths for p, gg in _group_paths(cfg, q, site.layers or ())
                     if gg == g]
            lead = () if g is None else (cfg.layer_groups()[g][1],)
            if site.kind == "weight":
                _attach_weight_lora(lm, paths[0], spec, rngs, lead, n)
                continue
            denses = [_module(lm, p) for p in paths]
            first = denses[0]
            kernel = first.kernel
            k = kernel[...]
            in_shape = k.shape[len(lead):len(lead) + first.in_rank]
            names = _names(kernel)
            in_names = names[len(lead):len(lead) + first.in_rank]
            a = Adapter(peft_ops.kaiming_uniform(rngs.params(), (*lead, *in_shape, spec.r),
                                                 math.prod(in_shape)),
                        sharding_names=(*names[:len(lead)], *in_names, None),
                        eager_sharding=False)
            for dense in denses:
                kn = _names(dense.kernel)
                out_shape = dense.kernel[...].shape[len(lead) + dense.in_rank:]
                b = Adapter(jnp.zeros((*lead, spec.r, *out_shape), jnp.float32),
                            sharding_names=(*kn[:len(lead)], None,
                                            *kn[len(lead) + dense.in_rank:]),
                            eager_sharding=False)
                dense.lora = LoRA(a, b, spec.scale, spec.dropout, salt=n)


def _attach_weight_lora(lm, path, spec: LoraSpec, rngs, lead, salt):
    """LoRA on a MoE weight: experts [*lead, e, in, out] (one A, B per expert) or a shared
    expert's [*lead, in, out]."""
    moe = _module(lm, path[:-1])
    name = path[-1]
    w = getattr(moe, name)
    shape = w[...].shape
    names = _names(w)
    inner = shape[:-2]   # lead (+ experts)
    fan_in = shape[-2]
    a = Adapter(peft_ops.kaiming_uniform(rngs.params(), (*inner, fan_in, spec.r), fan_in),
                sharding_names=(*names[:-1], None), eager_sharding=False)
    b = Adapter(jnp.zeros((*inner, spec.r, shape[-1]), jnp.float32),
                sharding_names=(*names[:-2], None, names[-1]), eager_sharding=False)
    setattr(moe, f"{name}_lora", LoRA(a, b, spec.scale, spec.dropout, salt=salt))


def _attach_bottleneck(lm, spec: BottleneckSpec, rngs):
    cfg = lm.cfg
    d = cfg.d_model
    for g, (_, n) in enumerate(cfg.layer_groups()):
        block = lm.blocks[g]
        for where in spec.where:
            # down as nn.Linear would be (Kaiming-uniform); up and its bias zero.
            make = lambda v, names: Adapter(v, sharding_names=("layers", *names),  # noqa: E731
                                            eager_sharding=False)
            ad = Bottleneck(
                make(peft_ops.kaiming_uniform(rngs.params(), (n, d, spec.dim), d), ("embed", None)),
                make(peft_ops.kaiming_uniform(rngs.params(), (n, spec.dim), d), (None,)),
                make(jnp.zeros((n, spec.dim, d)), (None, "embed")),
                make(jnp.zeros((n, d)), ("embed",)), spec.activation)
            setattr(block, f"{where}_adapter", ad)


def adapters_of(lm) -> list:
    """Every LoRA / Bottleneck / Prefix module attached to lm."""
    return [m for _, m in nnx.iter_modules(lm) if isinstance(m, (LoRA, Bottleneck, Prefix))]


def set_enabled(lm, enabled: bool):
    """Switch every attached adapter on or off, in place; off, the model computes its
    base alone (the weights stay, so switching back restores the adapted model). The
    flag is static, part of the graph: `nnx.split` of a switched-off model gives a graph
    that computes the base over the very same arrays (DPO's reference model, with no
    second copy of the weights). A merged LoRA is already in its base weight and cannot
    be switched off."""
    for m in adapters_of(lm):
        if not enabled and getattr(m, "merged", False):
            raise ValueError("a merged LoRA cannot be switched off; unmerge(lm) first")
        m.enabled = enabled
    return lm


def loras(lm) -> list[tuple[tuple, LoRA]]:
    return [(p, m) for p, m in nnx.iter_modules(lm) if isinstance(m, LoRA)]


# Merging ----------------------------------------------------------------------------
def merge(lm):
    """Fold every LoRA into its base weight (W += s·A·B); calls then skip the delta. The
    adapter weights stay, so `unmerge` restores W (up to float rounding)."""
    _fold(lm, +1)
    return lm


def unmerge(lm):
    _fold(lm, -1)
    return lm


def _fold(lm, sign: int):
    for path, lora in loras(lm):
        if lora.stacked:
            raise ValueError("stacked adapters cannot be merged: rows use different ones")
        if lora.merged == (sign > 0):
            continue
        owner = _module(lm, path[:-1])
        name = path[-1]
        # a Dense's `lora`, or a MoE weight's `<name>_lora`
        w = owner.kernel if name == "lora" else getattr(owner, name[:-len("_lora")])
        lead = lora.a[...].ndim + lora.b[...].ndim - w[...].ndim - 2
        lora.merged = False
        w.set_value(peft_ops.merge_lora(w[...], lora.a[...], lora.b[...],
                                        sign * lora.scale, lead))
        lora.merged = sign > 0


# Several adapters in one batch --------------------------------------------------------
def attach_stacked(lm, adapted: list):
    """Put the adapters of `adapted` (CausalLMs over lm's base, one adapter each) on lm at
    once, stacked on an adapter axis; row b of a call then uses adapted[ids[b]] with
    `PeftInputs(ids=...)` (−1: no adapter). In place (lm must have none yet); returns lm.

    LoRA: every Dense some adapter targets gets A [*(layers), n, *in, R] and B [*(layers),
    n, R, *out], R the largest rank there: smaller ranks are zero-padded and adapters that
    skip the module are zero, so each row's delta is exactly its own adapter's. GPT-2's
    fused c_attn keeps one A for q, k and v. Bottleneck adapters likewise (padded to the
    widest; zero weights are the identity). Prefix adapters add no module weights: their
    keys and values go into their rows' cache (jaxlm.infer.adapters). Only the adapter weights of
    `adapted` are read; that they share lm's base is the caller's promise."""
    if adapters_of(lm):
        raise ValueError("attach_stacked needs the base model, with no adapter attached")
    if not adapted:
        raise ValueError("attach_stacked needs at least one adapted model")
    for i, m in enumerate(adapted):
        if m.cfg != lm.cfg:
            raise ValueError(f"adapted[{i}] has another Config than the base model; stack "
                             f"adapters trained on this base only")
        if not adapters_of(m):
            raise ValueError(f"adapted[{i}] has no adapter attached (attach or load_peft one)")
        for path, lora in loras(m):
            _check_stackable(lm.cfg, i, path, lora)
    _stack_loras(lm, adapted)
    _stack_bottlenecks(lm, adapted)
    return lm


def _check_stackable(cfg: Config, i: int, path, lora: LoRA) -> None:
    where = ".".join(map(str, path[:-1]))
    if path[-1] != "lora":
        what = "MoE expert weights, which are read whole rather than applied per row"
    elif path[-2] == "kv_b" and cfg.attention == "mla":
        what = "MLA's kv_b, whose kernel is read whole rather than applied per row"
    elif lora.merged:
        raise ValueError(f"adapted[{i}] has its LoRA merged into its weights; unmerge it "
                         f"(jaxlm.model.peft.unmerge) before stacking")
    else:
        return
    raise ValueError(f"adapted[{i}] puts LoRA on {what} ({where}); such an adapter cannot "
                     f"share a batch with others: serve it alone (Engine(adapted_lm), "
                     f"optionally merge=True)")


def _stacked(like, values, lead: int, rank_axis: int | None, rank: int) -> Adapter:
    """An Adapter [*lead, n, ...] of `values` (None: zeros), each zero-padded on rank_axis
    to `rank`; logical names as `like`'s with the adapter axis unnamed."""
    ref = next(v for v in values if v is not None)
    shape = list(ref.shape)
    if rank_axis is not None:
        shape[rank_axis] = rank

    def pad(v):
        if v is None:
            return jnp.zeros(shape, ref.dtype)
        widths = [(0, 0)] * v.ndim
        if rank_axis is not None:
            widths[rank_axis] = (0, rank - v.shape[rank_axis])
        return jnp.pad(v, widths)
    names = _names(like)
    return Adapter(jnp.stack([pad(v) for v in values], axis=lead),
                   sharding_names=(*names[:lead], None, *names[lead:]), eager_sharding=False)


def _stack_loras(lm, adapted: list) -> None:
    n = len(adapted)
    found: dict[tuple, list] = {}    # Dense path → each adapter's LoRA there, or None
    for i, m in enumerate(adapted):
        for path, lora in loras(m):
            found.setdefault(path[:-1], [None] * n)[i] = lora
    stacked_a = {}                   # the adapters' own A's → one stacked A (shared A)
    for path, per in found.items():
        dense = _module(lm, path)
        here = [x for x in per if x is not None]
        lead = here[0].a[...].ndim - 1 - dense.in_rank
        rank = max(x.a[...].shape[-1] for x in here)
        key = tuple(None if x is None else id(x.a) for x in per)
        if key not in stacked_a:
            stacked_a[key] = _stacked(here[0].a, [None if x is None else x.a[...] for x in per],
                                      lead, -1, rank)
        # Each adapter's scale is folded into its B, so the stack's own scales are all 1:
        # the compiled step then holds no adapter's numbers, and a server can swap the
        # adapter in a slot (new arrays, same program) without compiling again.
        b = _stacked(here[0].b, [None if x is None else x.b[...] * x.scale for x in per],
                     lead, lead, rank)
        dense.lora = LoRA(stacked_a[key], b, (1.0,) * n, stacked=True)


def _stack_bottlenecks(lm, adapted: list) -> None:
    for g, block in enumerate(lm.blocks):
        for where in ("attn", "mlp"):
            per = [getattr(m.blocks[g], f"{where}_adapter") for m in adapted]
            here = [x for x in per if x is not None]
            if not here:
                continue
            acts = sorted({x.activation for x in here})
            if len(acts) > 1:
                raise ValueError(f"bottleneck adapters with different activations "
                                 f"({', '.join(acts)}) cannot share a batch; serve them "
                                 f"in separate engines")
            dim = max(x.down[...].shape[-1] for x in here)
            parts = [_stacked(getattr(here[0], name),
                              [None if x is None else getattr(x, name)[...] for x in per],
                              1, axis, dim)
                     for name, axis in (("down", -1), ("down_bias", -1), ("up", 1),
                                        ("up_bias", None))]
            setattr(block, f"{where}_adapter", Bottleneck(*parts, acts[0], stacked=True))
