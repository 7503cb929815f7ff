"""The training run: corpus → tokenizer → model → steps with checkpoints → report.

    summary = train(TrainConfig(steps=100, run_dir="runs/demo"), preset("tiny", d_model=128))

Testing aid: the environment variable JAXLM_TRAIN_STEP_SLEEP (seconds) makes every step
sleep that long, so a test can kill a run at a point of its choosing.
"""
from __future__ import annotations

import glob
import math
import os
import time

import jax
import numpy as np

from jaxlm.model import Config
from jaxlm.model import peft
from jaxlm.model.build import SplitModel, with_heads
from jaxlm.model.heads import HEADS
from jaxlm.model.io.base_ref import load_base
from jaxlm.model.io.runs import read_run_file, write_run_file
from jaxlm.model.sharding import make_mesh

from . import data as D
from .checkpoint import Checkpointer
from .config import TrainConfig, with_head_fields
from .finetune import save_adapter
from .report import MetricsLog, Progress, Throughput, measure_matmul_peak, plot_losses
from .sample import generate_text
from .step import (NEXT_TOKEN, count_params, flops_per_token, init_state, make_eval_step,
                   make_optimizer, make_train_step)
from .tasks import PostTraining

RUNS = "runs"


class NoLog:
    """Stands in for MetricsLog on processes other than the first."""

    def write(self, record: dict) -> None:
        pass


class TrainingDiverged(ValueError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


def default_run_dir(preset: str) -> str:
    return os.path.join(RUNS, f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def newest_run(root: str = RUNS) -> str:
    runs = glob.glob(os.path.join(root, "*", "run.json"))
    if not runs:
        raise ValueError(f"--resume: no runs under {root}/ to continue; pass --run_dir")
    return os.path.dirname(max(runs, key=os.path.getmtime))


def evaluate(eval_step, state, val) -> float:
    total, count = 0.0, 0.0
    for batch in val:
        s, n = eval_step(state, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _finite(*xs) -> bool:
    return all(math.isfinite(float(x)) for x in xs)


def prepare_data(tcfg: TrainConfig, cfg: Config, resuming: bool, vocab_from_tokenizer: bool,
                 **run_file_extra):
    """(cfg with its final vocab_size, tokenizer, train stream, val stream); writes run.json
    (with run_file_extra: an adapter run's spec and base reference)."""
    corpus = D.load_corpus(tcfg.corpus, tcfg.val_fraction, tcfg.jsonl_field, tcfg.bin_dtype)
    tokenizer, tok_spec = D.make_tokenizer(tcfg.tokenizer, corpus.train, tcfg.run_dir,
                                           resume=resuming)
    if vocab_from_tokenizer and not resuming:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"--model.vocab_size {cfg.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size} ids; raise it or drop it")
    train_stream, val_stream = D.token_streams(corpus, tokenizer, tcfg.seq_len,
                                               tcfg.val_fraction)
    D.check_vocab(train_stream, cfg.vocab_size, "the training split")
    D.check_vocab(val_stream, cfg.vocab_size, "the validation split")
    write_run_file(tcfg.run_dir, cfg, tok_spec, train=tcfg.to_dict(),
                   corpus={"name": corpus.name, "train_tokens": len(train_stream),
                           "val_tokens": len(val_stream)}, **run_file_extra)
    return cfg, tokenizer, train_stream, val_stream


def build(tcfg: TrainConfig, cfg: Config, mesh=None, base=None):
    """(SplitModel, optimizer, initial TrainState), born sharded over the mesh when given.
    base: a loaded model to fine-tune (all of it, or with --peft an adapter attached to it,
    the base frozen)."""
    if base is None:
        model = SplitModel.create(cfg, tcfg.seed, mesh)
    elif tcfg.heads_only:
        model = SplitModel(with_heads(base, cfg.mtp_depth, cfg.medusa_heads, tcfg.seed),
                           trainable=HEADS)
    elif tcfg.peft:
        model = SplitModel(peft.attach(base, tcfg.peft_spec(), seed=tcfg.seed),
                           trainable=peft.Adapter)
    else:
        model = SplitModel(with_heads(base, cfg.mtp_depth, cfg.medusa_heads, tcfg.seed))
    optimizer = make_optimizer(tcfg, model.params)
    state = init_state(tcfg, cfg, model.params, optimizer, mesh, model.rest.to_pure_dict())
    # The state owns the variables from here on: the first step donates these arrays.
    model.params = None
    return model, optimizer, state


def train(tcfg: TrainConfig, cfg: Config | None, *, resume_step: int | None = None,
          vocab_from_tokenizer: bool = True, log=print, base_dtype: str | None = None) -> dict:
    """Runs (or continues) the training described by tcfg/cfg in tcfg.run_dir.

    With vocab_from_tokenizer the model's vocab_size becomes the tokenizer's (a preset's
    128k-row table is waste for 256 byte ids); otherwise it must be at least as large.
    With tcfg.init the model is that base (cfg None: the base's own; base_dtype its compute
    dtype), fine-tuned whole or, with tcfg.peft, through an adapter alone.
    Returns a summary dict (final losses, perplexity, sample, speed)."""
    t_start = time.perf_counter()
    os.makedirs(tcfg.run_dir, exist_ok=True)
    mesh = make_mesh(tcfg.mesh) if tcfg.mesh else None
    if mesh is not None:  # a size of -1 is known only now
        tcfg._check_sequence(dict(mesh.shape).get("sequence", 1))
    base, extra = None, {}
    if tcfg.init:
        base, cfg, extra = _base(tcfg, cfg, resume_step, mesh, base_dtype)
        cfg = with_head_fields(tcfg, cfg)
        vocab_from_tokenizer = False
    lead = jax.process_index() == 0  # one process reports and writes run files
    log = log if lead else (lambda *a, **k: None)
    post = None
    if tcfg.task == "lm":
        cfg, tokenizer, train_stream, val_stream = prepare_data(
            tcfg, cfg, resume_step is not None, vocab_from_tokenizer, **extra)
        data = (f"{tcfg.corpus}: {len(train_stream):,} train / {len(val_stream):,} val "
                f"tokens, tokenizer {tcfg.tokenizer} ({tokenizer.vocab_size})")
    else:
        post = PostTraining(tcfg, cfg, resume_step is not None, log, **extra)
        tokenizer = post.tokenizer
        data = f"--task {tcfg.task} on {tcfg.data}"
    model, optimizer, state = build(tcfg, cfg, mesh, base)
    if post is None:
        objective = NEXT_TOKEN
        it = D.batches(train_stream, tcfg.seq_len, tcfg.batch_size, tcfg.grad_accum,
                       tcfg.seed)
        val = D.val_batches(val_stream, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches)
        eval_step = make_eval_step(model, mesh, tcfg.sequence_order)
        evaluator = (lambda st: {"val_loss": evaluate(eval_step, st, val)}) if val else None
        tokens_per_step = tcfg.seq_len * tcfg.batch_size * tcfg.grad_accum
    else:   # before any restore: the state still holds the starting weights (reference)
        objective, it, evaluator, tokens_per_step = post.setup(model, state, mesh)
    ckpt = Checkpointer(tcfg.run_dir, tcfg.keep)
    if resume_step is not None:
        state, data_state = ckpt.restore(state, resume_step)
        it.set_state(data_state)
    log(f"run {tcfg.run_dir}: {tcfg.preset} ({count_params(state.params) / 1e6:.2f}M "
        f"parameters, {cfg.dtype} compute), {data}, "
        + (f"resuming at step {int(state.step)}" if resume_step is not None
           else "from scratch")
        + (f", mesh {dict(mesh.shape)} over {jax.process_count()} process(es)" if mesh else ""))
    peak = measure_matmul_peak(cfg.dtype)
    if mesh is not None and jax.default_backend() != "cpu":  # emulated CPU devices share cores
        peak *= mesh.size
    frozen = None if model.frozen is None else model.frozen.to_pure_dict()
    speed = Throughput(tokens_per_step, flops_per_token(cfg, state.params, tcfg.seq_len,
                                                        frozen), peak)
    base_eval = None
    if tcfg.init and resume_step is None and evaluator:  # the base's own figures
        base_eval = evaluator(state)
        if tcfg.task == "dpo":
            log("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in base_eval.items()))
        elif base_eval:
            v = base_eval["val_loss"]
            log(f"base validation loss {v:.4f} (perplexity {math.exp(min(v, 700)):.3f})")
    on_save = None
    if tcfg.peft and lead:
        on_save = lambda st: save_adapter(  # noqa: E731
            model.merge(st.params, st.rest), tcfg.run_dir, extra["base"]["path"])
    try:
        state, summary = run_steps(
            tcfg, make_train_step(model, tcfg, optimizer, mesh, objective), evaluator,
            state, it, ckpt, speed,
            MetricsLog(tcfg.run_dir, resume_step) if lead else NoLog(), quiet=not lead,
            on_save=on_save)
    finally:
        ckpt.close()
    summary.update(run_dir=tcfg.run_dir, seconds=time.perf_counter() - t_start,
                   base_val_loss=(base_eval or {}).get("val_loss"), base_eval=base_eval,
                   task=tcfg.task)
    if tcfg.plot and lead:
        summary["plot"] = plot_losses(tcfg.run_dir)
    if tcfg.sample_tokens:
        # a post-trained model answers chats: --sample_prompt is the user's turn
        prompt = (tcfg.sample_prompt if post is None else post.template.render(
            [{"role": "user", "content": tcfg.sample_prompt}]))
        summary["sample"] = generate_text(model.merge(state.params, state.rest), tokenizer,
                                          prompt, tcfg.sample_tokens, tcfg.seed, mesh=mesh)
    return summary


def run_steps(tcfg, step_fn, evaluator, state, it, ckpt, speed, metrics_log,
              quiet: bool = False, on_save=None):
    """The loop proper: step, check, report, evaluate (evaluator(state) → {"val_loss",
    ...}, or None: nothing held out), checkpoint (and on_save(state): an adapter run's
    RUN/peft/). (state, summary)."""
    bar = Progress(tcfg.progress, tcfg.steps, int(state.step), quiet)
    sleep = float(os.environ.get("JAXLM_TRAIN_STEP_SLEEP", "0"))
    first_loss = last_loss = val_loss = None
    val_metrics = {}
    try:
        while int(state.step) < tcfg.steps:
            t0 = time.perf_counter()
            state, m = step_fn(state, next(it))
            m = jax.device_get(m)
            speed.add(time.perf_counter() - t0)
            step = int(state.step)
            if not _finite(m["loss"]) or not (m["skipped"] or _finite(m["grad_norm"])):
                raise _diverged(m, step, ckpt, tcfg.run_dir)
            first_loss = first_loss if first_loss is not None else float(m["loss"])
            last_loss = float(m["loss"])
            tps, mfu = speed.rates()
            bar.update(loss=f"{last_loss:.3f}", **_bar_extra(m), tok_s=f"{tps:,.0f}",
                       mfu=f"{mfu:.1%}")
            last = step == tcfg.steps
            if step % tcfg.log_every == 0 or last:
                metrics_log.write({"step": step, "loss": last_loss, "ce": float(m["ce"]),
                                   "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                                   "tokens": step * speed.tokens, "tokens_per_s": tps,
                                   "mfu": mfu, **_extra(m, tcfg), "time": time.time()})
            if evaluator and (step % tcfg.eval_every == 0 or last):
                val_metrics = evaluator(state)
                val_loss = val_metrics.get("val_loss")
                if tcfg.task != "dpo" and val_loss is not None:
                    val_metrics["val_ppl"] = math.exp(min(val_loss, 700))
                metrics_log.write({"step": step, **val_metrics})
                bar.write(f"step {step}: train loss {last_loss:.4f}, " + ", ".join(
                    f"{k} {v:.4f}" for k, v in val_metrics.items() if k != "val_ppl"))
            if step % tcfg.checkpoint_every == 0 or last:
                ckpt.save(state, it.get_state())
                if on_save is not None:
                    on_save(state)
            if sleep:
                time.sleep(sleep)
    finally:
        bar.close()
    tps, mfu = speed.rates()
    return state, {"steps": int(state.step), "first_loss": first_loss, "final_loss": last_loss,
                   "val_loss": val_loss,
                   "val_ppl": (math.exp(min(val_loss, 700)) if val_loss is not None and
                               tcfg.task != "dpo" else None), "val": val_metrics,
                   "tokens_per_s": tps, "mfu": mfu, "matmul_peak_flops": speed.peak}


def _base(tcfg: TrainConfig, cfg: Config | None, resume_step, mesh, dtype=None):
    """(the base model, its Config, run.json entries) for --init. A resumed adapter run
    reloads the base its run.json names, refusing one whose content changed."""
    run_file = read_run_file(tcfg.run_dir) if resume_step is not None else {}
    ref = run_file.get("base")
    if ref is not None:
        lm, ref = load_base(ref["path"], cfg.dtype, ref.get("step"), mesh, expect=ref["sha256"])
    else:
        lm, ref = load_base(tcfg.init, dtype, None, mesh)
    if lm.cfg.weight_quant is not None and not tcfg.peft:
        raise ValueError(f"the base {tcfg.init!r} has {lm.cfg.weight_quant} weights, which "
                         f"only an adapter can train (QLoRA): add --peft SPEC, or start "
                         f"from the float model")
    extra = {"base": ref}
    if tcfg.peft:
        extra["peft"] = peft.spec_to_dict(tcfg.peft_spec())
    if tcfg.heads_only:
        extra["heads_only"] = True
    return lm, lm.cfg, extra


def _diverged(m, step: int, ckpt: Checkpointer, run_dir: str) -> TrainingDiverged:
    good = ckpt.latest_step()
    where = f"step {good} in {run_dir}" if good is not None else "none (none was saved yet)"
    return TrainingDiverged(
        f"loss became {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step "
        f"{step}; stopped. The last good checkpoint is {where}; lower --lr, raise "
        f"--warmup_steps or keep --clip_norm")


def _extra(m, tcfg: TrainConfig) -> dict:
    """Optional metrics worth a column only when they carry information."""
    out = {}
    if tcfg.z_loss:
        out["z_loss"] = float(m["z_loss"])
    if float(m["loss_scale"]) != 1.0:
        out["loss_scale"] = float(m["loss_scale"])
        out["skipped"] = bool(m["skipped"])
    out.update({k: float(np.mean(v)) for k, v in m.items() if k.startswith("aux/")})
    out.update({k: float(m[k]) for k in ("load_imbalance", "router_bias_max") if k in m})
    out.update({k: float(v) for k, v in m.items() if k.startswith(("mtp_ce/", "medusa_ce/"))})
    out.update({k: float(v) for k, v in m.items()  # DPO's, named as TRL logs them
                if k.startswith(("rewards/", "logps/")) or k in DPO_EXTRA})
    return out


DPO_EXTRA = ("preference_loss", "nll", "likelihood_accuracy")


def _bar_extra(m) -> dict:
    """The progress bar's DPO columns: reward accuracy and margin."""
    if "rewards/accuracies" not in m:
        return {}
    return {"acc": f"{float(m['rewards/accuracies']):.2f}",
            "margin": f"{float(m['rewards/margins']):.3f}"}
