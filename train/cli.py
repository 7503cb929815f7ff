"""`python -m jaxlm.train`: settings from the command line (see config.py for the
convention), the run, and a closing report. Bad input ends in one line on stderr."""
from __future__ import annotations

import os
import sys

from jaxlm.model import Config
from jaxlm.model.io.runs import read_run_file

from .config import RESUME_MAY_CHANGE, TrainConfig, help_text, model_config, parse_overrides
from .finetune import INIT_MAY_CHANGE
from .loop import TrainingDiverged, default_run_dir, newest_run, train


def resolve(argv: list[str]):
    """argv → (TrainConfig, model Config (None: the --init base's), step to resume from or
    None, whether the vocabulary size follows the tokenizer, the base's compute dtype)."""
    train_over, model_over = parse_overrides(argv)
    if train_over.get("init") and not train_over.get("resume"):
        tcfg, cfg, step, dtype = _init(train_over, model_over)
        return tcfg, cfg, step, False, dtype
    if not train_over.get("resume"):
        tcfg = TrainConfig(**train_over)
        run_dir = tcfg.run_dir or default_run_dir(tcfg.preset)
        _refuse_existing(run_dir)
        return tcfg.replace(run_dir=run_dir), model_config(tcfg, model_over), None, \
            "vocab_size" not in model_over, None
    return (*_resume(train_over, model_over), False, None)


def _init(train_over: dict, model_over: dict):
    """A fine-tuning run: the model and the tokenizer are the base's (a preset or a model
    field that would change it is refused); the compute dtype may change."""
    from jaxlm.model.io.base_ref import base_config, base_kind, base_tokenizer
    from jaxlm.model.peft import check_attachable
    for name in ("preset", "tokenizer"):
        if name in train_over:
            raise ValueError(f"--{name} cannot be set with --init: the base brings its own "
                             f"model and tokenizer")
    fixed = sorted(set(model_over) - INIT_MAY_CHANGE)
    if fixed:
        raise ValueError(f"--model.{fixed[0]} cannot be set with --init: the base's config "
                         f"is its weights' (only --model.dtype may change)")
    path = train_over["init"]
    kind = base_kind(path)
    tcfg = TrainConfig(**{**train_over, "tokenizer": base_tokenizer(path, kind)})
    if tcfg.peft:     # targets that match nothing etc. fail now, before anything is written
        check_attachable(base_config(path, kind), tcfg.peft_spec())
    name = "ft-" + os.path.basename(os.path.normpath(path))
    run_dir = tcfg.run_dir or default_run_dir(name)
    _refuse_existing(run_dir)
    return tcfg.replace(run_dir=run_dir), None, None, model_over.get("dtype")


def _refuse_existing(run_dir: str) -> None:
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(
            os.path.join(run_dir, "checkpoints")):
        raise ValueError(f"--run_dir {run_dir!r} already holds checkpoints; add --resume "
                         f"to continue it, or choose another --run_dir")


def _resume(train_over: dict, model_over: dict):
    """A resumed run starts from its own recorded settings; overrides may change only
    what leaves the parameters and the data stream as they were."""
    run_dir = train_over.get("run_dir") or newest_run()
    meta = read_run_file(run_dir)
    saved = TrainConfig(**meta["train"])
    tcfg = saved.replace(**{**train_over, "run_dir": run_dir})
    for name, value in train_over.items():
        if name not in RESUME_MAY_CHANGE and getattr(saved, name) != value:
            raise ValueError(f"--resume: {run_dir} was trained with --{name} "
                             f"{getattr(saved, name)!r}, not {value!r}; drop that override "
                             f"or start a new run")
    cfg = Config.from_dict(meta["model"])
    for name, value in model_over.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"--resume: {run_dir} has model {name}={getattr(cfg, name)!r}, "
                             f"not {value!r}; a checkpoint cannot change the model's shape "
                             f"or numerics — drop --model.{name} or start a new run")
    from .checkpoint import Checkpointer
    ckpt = Checkpointer(run_dir, tcfg.keep)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise ValueError(f"--resume: {run_dir} has no finished checkpoint yet; start it "
                         f"again without --resume")
    return tcfg, cfg, step


def join_processes(argv: list[str]) -> None:
    """Multi-host runs: jax.distributed joins the processes before any device is used."""
    from jaxlm.model.sharding import init_distributed
    over, _ = parse_overrides(argv)
    init_distributed(over.get("coordinator", ""), over.get("num_processes", 1),
                     over.get("process_id", 0))


def use_compilation_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent cache) so that a second run or a
    resume of the same shapes starts in seconds; JAX_COMPILATION_CACHE_DIR overrides the
    place, JAXLM_COMPILATION_CACHE=0 turns it off."""
    import jax
    if os.environ.get("JAXLM_COMPILATION_CACHE", "1") == "0":
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(
            os.path.expanduser("~"), ".cache", "jaxlm", "xla"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    use_compilation_cache()
    try:
        join_processes(argv)
        tcfg, cfg, resume_step, vocab_from_tokenizer, base_dtype = resolve(argv)
        if resume_step is not None and resume_step >= tcfg.steps:
            print(f"{tcfg.run_dir} is already at step {resume_step} of {tcfg.steps}; raise "
                  f"--steps to train further", file=sys.stderr)
            return 0
        summary = train(tcfg, cfg, resume_step=resume_step,
                        vocab_from_tokenizer=vocab_from_tokenizer, base_dtype=base_dtype)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if jax.process_index() == 0:
        report(summary)
    return 0


def report(s: dict) -> None:
    lines = [f"trained {s['steps']} steps in {s['seconds']:.0f} s: loss {s['first_loss']:.3f}"
             f" → {s['final_loss']:.3f}" if s["first_loss"] is not None else
             f"nothing left to train ({s['steps']} steps)"]
    if s.get("base_val_loss") is not None and s.get("task") != "dpo":
        lines.append(f"base model's validation loss {s['base_val_loss']:.4f} (before "
                     f"fine-tuning)")
    if s.get("task") == "dpo" and s.get("val"):
        v, b = s["val"], s.get("base_eval") or {}
        before = f"{b['val_loss']:.4f} → " if "val_loss" in b else ""
        lines.append(f"held-out pairs: reward accuracy {v['val_rewards/accuracies']:.3f}, "
                     f"margin {v['val_rewards/margins']:.3f}, loss {before}"
                     f"{v['val_loss']:.4f}")
        if "val_likelihood_accuracy" in b:
            lines.append(f"the base prefers the chosen answer (higher log-prob) on "
                         f"{b['val_likelihood_accuracy']:.3f} of them; after training "
                         f"{v['val_likelihood_accuracy']:.3f}")
    elif s["val_loss"] is not None:
        lines.append(f"validation loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.3f}")
    lines.append(f"speed {s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%} of a measured "
                 f"matmul peak of {s['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s")
    if s.get("plot"):
        lines.append(f"loss plot {s['plot']}")
    if s.get("sample") is not None:
        lines += ["sample:", "-" * 60, s["sample"], "-" * 60]
    lines += [f"run folder {s['run_dir']}",
              f"continue with: python -m jaxlm.infer --checkpoint {s['run_dir']}"]
    print("\n".join(lines), flush=True)
