"""The trainer's settings, and the one command-line convention that overrides them.

    python -m jaxlm.train [--FIELD VALUE | --FIELD=VALUE]... [--model.FIELD VALUE]...

`--FIELD` sets a TrainConfig field below (`--steps 500`, `--corpus ./docs`);
`--model.FIELD` sets a field of the model Config chosen by `--preset`
(`--model.d_model 128`, `--model.dtype bfloat16`). A flag with no value sets a
boolean field to true (`--resume`). Text fields take the text as it is; other values
are read as JSON (numbers, true/false, null, {"kind": "yarn", ...}).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from typing import Any

from jaxlm.model import PRESETS, Config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train ---------------------------------------------------------------
    preset: str = "tiny"             # a key of jaxlm.model.PRESETS; --model.FIELD refines it
    init: str = ""                   # start from this base instead: an HF model directory or
                                     # a jaxlm run directory (its config and tokenizer)
    peft: str = ""                   # with --init: train only an adapter, e.g.
                                     # lora:r=8,alpha=16,targets=q_proj,v_proj | prefix:tokens=16
                                     # | adapter:dim=32 (jaxlm.model.peft.parse_spec)
    mtp_depth: int | None = None     # DeepSeek-V3 multi-token prediction modules D (None:
                                     # the model's own; also --model.mtp_depth)
    mtp_weight: float = 0.3          # λ: the MTP loss is λ × the mean of its D depths' losses
    medusa_heads: int | None = None  # Medusa heads K (None: the model's own)
    medusa_decay: float = 0.8        # head k's loss weight is decay^k (the Medusa paper's)
    heads_only: bool = False         # with --init: train only the MTP / Medusa heads, the
                                     # base frozen (Medusa-1; MTP heads for a released model)
    # Post-training (with --init): supervised fine-tuning and preference optimisation ------
    task: str = "lm"                 # lm: next-token on --corpus | sft: --data chats or
                                     # prompt/completion, loss on the answers only | dpo:
                                     # --data prompt/chosen/rejected pairs (train/chat.py)
    data: str = ""                   # --task sft|dpo: a .jsonl, or the embedded stdlib-sft /
                                     # stdlib-dpo (train/examples.py)
    val_data: str = ""               # held-out .jsonl (default: --data's last val_fraction;
                                     # the embedded sets' own held-out files)
    max_bad_fraction: float = 0.0    # unusable --data lines dropped (with a warning naming
                                     # them) up to this fraction; above it the run refuses
    loss: str = "dpo"                # --task dpo: dpo | ipo | cdpo | robust | hinge | simpo |
                                     # orpo (jaxlm.ops.preference)
    beta: float = 0.1                # DPO's β (IPO's τ, SimPO's β, ORPO's λ)
    label_smoothing: float = 0.0     # ε of cdpo and robust; the name means other losses in
                                     # other libraries (see jaxlm/ops/preference.py)
    simpo_gamma: float = 0.5         # SimPO's target reward margin γ
    reference: str = "precomputed"   # DPO's reference log-probs: precomputed (once, before
                                     # training; kept in the run) | copy (a frozen copy of the
                                     # starting weights, on the fly) | adapter_off (with --peft:
                                     # the same weights with the adapter switched off)
    corpus: str = "stdlib"           # "stdlib", a text file, a folder, a .jsonl, or .bin tokens
    tokenizer: str = "byte"          # "byte", "bpe:N" (train N tokens), or a tokenizer.json path
    jsonl_field: str = "text"        # the JSONL key holding each document's text
    bin_dtype: str = "uint16"        # element type of pre-tokenized .bin files (or uint32)
    val_fraction: float = 0.05       # held out by file (by tail for one file / one .bin)
    # Batches ------------------------------------------------------------------------
    seq_len: int = 128               # tokens per packed sequence
    batch_size: int = 16             # sequences per micro-batch
    grad_accum: int = 1              # micro-batches summed into one optimizer step
    steps: int = 200                 # optimizer steps in all (a resumed run counts from 0)
    seed: int = 0                    # parameters and data order
    # Optimizer (AdamW, linear warmup then cosine decay) -----------------------------------
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # the cosine ends at lr × this
    warmup_steps: int = 20
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1        # never applied to norm scales and biases
    decay_embeddings: bool = True    # false: embeddings join the no-decay group too
    clip_norm: float = 1.0           # global gradient norm limit; 0 turns clipping off
    z_loss: float = 0.0              # weight of mean(logsumexp(logits)²), e.g. 1e-4
    aux_loss_weight: float = 0.01    # weight of every model aux entry named "*_loss" (MoE)
    aux_loss_weights: str = "router_z_loss=0.001"  # per-entry weights, "name_loss=w,..."
    router_bias_rate: float = 0.001  # sigmoid-router MoE (DeepSeek-V3's γ): after each step
                                     # every expert's selection bias moves ±this toward
                                     # equal load (aux-loss-free balancing); 0 = off
    loss_scale: str = "auto"         # "dynamic", "none", or "auto" (dynamic iff float16 compute)
    # Checkpoints, evaluation, output --------------------------------------------------------
    run_dir: str = ""                # default runs/<preset>-<timestamp>
    resume: bool = False             # continue the latest checkpoint of run_dir (or newest run)
    checkpoint_every: int = 50
    keep: int = 3                    # checkpoints kept (the newest K)
    eval_every: int = 50
    eval_batches: int = 4            # held-out batches per evaluation (--task lm; sft and
                                     # dpo evaluate every held-out example)
    log_every: int = 10              # metrics.jsonl lines (the bar updates every step)
    sample_tokens: int = 200         # generated at the end; 0 skips the sample
    sample_prompt: str = "def "
    progress: bool = True            # the progress bar (metrics.jsonl is always written)
    plot: bool = True                # loss.png at the end
    # Devices and hosts ---------------------------------------------------------------------
    mesh: str = ""                   # e.g. "data=2,fsdp=2,tensor=2" (axes data, fsdp, tensor,
                                     # expert, sequence; one size may be -1); "" = one device
    sequence_order: str = "zigzag"   # with a sequence axis: each row's tokens over its devices,
                                     # "zigzag" (equal causal work) or "contiguous"
    coordinator: str = ""            # multi-host: "HOST:PORT" of process 0, or "auto"
    num_processes: int = 1           # with --coordinator HOST:PORT: processes in the run
    process_id: int = 0              # with --coordinator HOST:PORT: this process's index

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"--{field}: {why}")

        if self.preset not in PRESETS:
            bad("preset", f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for f in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "keep",
                  "eval_every", "eval_batches", "log_every"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("warmup_steps", "sample_tokens", "seed"):
            if getattr(self, f) < 0:
                bad(f, f"must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.mesh:
            from jaxlm.model.sharding import parse_mesh_spec
            try:
                sizes = parse_mesh_spec(self.mesh)
            except ValueError as e:
                bad("mesh", str(e))
            self._check_sequence(sizes.get("sequence", 1))
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for f in ("mtp_depth", "medusa_heads"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(f, f"must be an int >= 0 (or none: the model's own), got {v!r}")
        if self.heads_only:
            if not self.init:
                bad("heads_only", "trains extra heads on a base model; add --init PATH")
            if self.peft:
                bad("heads_only", "cannot be combined with --peft; train one or the other")
            if not (self.mtp_depth or self.medusa_heads):
                bad("heads_only", "add the heads to train: --mtp_depth D or --medusa_heads K")
        for f in ("weight_decay", "clip_norm", "z_loss", "aux_loss_weight", "eps",
                  "router_bias_rate", "mtp_weight", "medusa_decay"):
            if not getattr(self, f) >= 0:  # NaN too
                bad(f, f"must be >= 0, got {getattr(self, f)}")
        if self.loss_scale not in ("auto", "dynamic", "none"):
            bad("loss_scale", f"{self.loss_scale!r} is not one of auto, dynamic, none")
        if self.bin_dtype not in ("uint16", "uint32"):
            bad("bin_dtype", f"{self.bin_dtype!r} is not uint16 or uint32")
        self.aux_weights()  # parse errors surface now, not mid-run
        self._check_task()
        if self.peft:
            if not self.init:
                bad("peft", "adapters are trained on a base model; add --init PATH (an HF "
                            "directory or a jaxlm run)")
            try:
                self.peft_spec()
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith("--peft") else
                                 f"--peft {self.peft!r}: {e}") from None
            if self.mesh:
                bad("peft", "adapter training on a --mesh is not supported yet; train on "
                            "one device")

    def _check_sequence(self, n: int):
        """A 'sequence' axis of n devices splits every row into equal chunks."""
        from jaxlm.model.context import ORDERS
        if self.sequence_order not in ORDERS:
            bad = f"{self.sequence_order!r} is not one of {', '.join(ORDERS)}"
            raise ValueError(f"--sequence_order: {bad}")
        pieces = n * (2 if self.sequence_order == "zigzag" else 1)
        if n > 1 and self.seq_len % pieces:
            raise ValueError(f"--seq_len {self.seq_len} does not split into {pieces} equal "
                             f"chunks for sequence={n} ({self.sequence_order} order); use a "
                             f"multiple of {pieces}")

    def _check_task(self):
        from jaxlm.ops.preference import LOSSES

        def bad(field, why):
            raise ValueError(f"--{field}: {why}")
        if self.task not in ("lm", "sft", "dpo"):
            bad("task", f"{self.task!r} is not one of lm, sft, dpo")
        if self.task == "lm":
            for f in ("data", "val_data"):
                if getattr(self, f):
                    bad(f, "is read by --task sft|dpo; pretraining (--task lm) reads --corpus")
            return
        if not self.init:
            bad("task", f"{self.task} fine-tunes a base model; add --init PATH (an HF "
                        f"directory or a jaxlm run)")
        if not self.data:
            bad("data", f"--task {self.task} needs --data FILE.jsonl (or stdlib-sft / "
                        f"stdlib-dpo, the embedded sets)")
        if self.heads_only:
            bad("heads_only", f"cannot be combined with --task {self.task}")
        if not 0 <= self.max_bad_fraction < 1:
            bad("max_bad_fraction", f"must be in [0, 1), got {self.max_bad_fraction}")
        if self.task != "dpo":
            return
        if self.loss not in LOSSES:
            bad("loss", f"{self.loss!r} is not one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            bad("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss in ("cdpo", "robust") and self.label_smoothing == 0:
            bad("loss", f"{self.loss} with --label_smoothing 0 is plain dpo; set the "
                        f"label noise ε, e.g. --label_smoothing 0.1")
        if self.reference not in ("precomputed", "copy", "adapter_off"):
            bad("reference", f"{self.reference!r} is not one of precomputed, copy, "
                             f"adapter_off")
        if self.reference == "adapter_off" and not self.peft:
            bad("reference", "adapter_off needs an adapter run (--peft SPEC); a full "
                             "fine-tune uses precomputed or copy")
        if self.mesh:
            bad("mesh", "--task dpo runs on one device for now; drop --mesh")

    def peft_spec(self):
        """The parsed --peft spec (None without one)."""
        if not self.peft:
            return None
        from jaxlm.model.peft import parse_spec
        return parse_spec(self.peft)

    def aux_weights(self) -> dict[str, float]:
        """The per-entry aux-loss weights given by aux_loss_weights."""
        out = {}
        for part in filter(None, (p.strip() for p in self.aux_loss_weights.split(","))):
            name, eq, value = part.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--aux_loss_weights: write name=weight pairs separated by "
                                 f"commas, e.g. load_balance_loss=0.01; got {part!r}") from None
            if not eq or not name.strip().endswith("_loss"):
                raise ValueError(f"--aux_loss_weights: {part!r} must be NAME_loss=weight")
        return out

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change; any other difference makes resuming an error,
# since it would change the parameters' shapes, the data order or the tokens.
RESUME_MAY_CHANGE = frozenset({
    "steps", "run_dir", "resume", "checkpoint_every", "keep", "eval_every", "eval_batches",
    "log_every", "sample_tokens", "sample_prompt", "progress", "plot",
    # where the arrays live, not what they hold: a checkpoint restores onto any mesh
    "mesh", "coordinator", "num_processes", "process_id", "sequence_order",
})


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(owner: str, name: str, text: str, hints) -> Any:
    """The command-line text as a value of the field's declared type (a string field takes
    the text as it is; ints may stand for floats)."""
    hint = hints[name]
    args = typing.get_args(hint) or (hint,)
    if args == (str,):
        return text
    value = _parse_value(text)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{owner}{name}: cannot be none")
    for t in args:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str:
            return value if isinstance(value, str) else json.dumps(value)
        if typing.get_origin(t) is tuple and isinstance(value, list):
            return tuple(value)  # e.g. --model.mlp_only_layers [0,3]
        if dataclasses.is_dataclass(t) and isinstance(value, dict):
            return value  # e.g. rope_scaling; Config turns the dict into RopeScaling
    wanted = " or ".join(getattr(t, "__name__", str(t)) for t in args)
    raise ValueError(f"{owner}{name}: expected {wanted}, got {value!r}")


def _unknown(owner: str, name: str, known) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(owner + c for c in close)}?" if close else ""
    return ValueError(f"unknown field {owner}{name}{hint} (see --help for the list)")


def parse_overrides(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """argv → (trainer field values, model field values), type-checked, unknowns refused."""
    train_fields, model_fields = _fields(TrainConfig), _fields(Config)
    train_hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(Config)
    train, model = {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}; write --FIELD VALUE or "
                             f"--model.FIELD VALUE")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        is_model = key.startswith("model.")
        name = key[len("model."):] if is_model else key
        owner, fields, hints, out = (("--model.", model_fields, model_hints, model) if is_model
                                     else ("--", train_fields, train_hints, train))
        if name not in fields:
            raise _unknown(owner, name, fields)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                if hints[name] is not bool:
                    raise ValueError(f"{owner}{name} needs a value")
                text = "true"
            else:
                text, i = nxt, i + 1
        out[name] = _coerce(owner, name, text, hints)
        i += 1
    return train, model


def model_config(tcfg: TrainConfig, model_overrides: dict[str, Any]) -> Config:
    if model_overrides.get("weight_quant") is not None:
        raise ValueError("--model.weight_quant: quantized weights are for inference; train "
                         "in float, then quantize (python -m jaxlm.infer --checkpoint RUN "
                         "--quantize int8 --save-quantized DIR), or fine-tune a quantized "
                         "base with --init DIR --peft SPEC")
    return with_head_fields(tcfg, PRESETS[tcfg.preset].replace(**model_overrides))


def with_head_fields(tcfg: TrainConfig, cfg: Config) -> Config:
    """cfg with the trainer's --mtp_depth / --medusa_heads, where given."""
    heads = {f: getattr(tcfg, f) for f in ("mtp_depth", "medusa_heads")
             if getattr(tcfg, f) is not None}
    return cfg.replace(**heads)


def help_text() -> str:
    lines = [__doc__.strip(), "", "Trainer fields (default):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name:<18} {f.default!r}")
    lines += ["", "Model fields (--model.FIELD; defaults come from the preset): "
              + ", ".join(f.name for f in dataclasses.fields(Config)),
              "", "Presets: " + ", ".join(sorted(PRESETS))]
    return "\n".join(lines)
