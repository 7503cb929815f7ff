"""`python -m jaxlm.serve`: an OpenAI-compatible HTTP server over the continuous-batching
Scheduler.

    python -m jaxlm.serve --hf ~/models/Qwen3-0.6B --port 8000
    python -m jaxlm.serve --checkpoint runs/tiny --model-name tiny --api-key secret
    python -m jaxlm.serve --hf DIR --adapter PEFT_DIR --kv-memory 2GiB --max-seqs 32
    python -m jaxlm.serve --hf DIR --lora-modules sql=PEFT_DIR_A chat=PEFT_DIR_B \
        --prompt-lookup 3 --mesh tensor=2

--adapter serves one PEFT adapter as the model itself: a LoRA is folded into the weights
(merged once at load, so decode costs what the base model's does; over quantized weights,
QLoRA, it runs unmerged), a bottleneck adapter runs as it is. --lora-modules NAME=DIR ...
serves several (vLLM's flag; LoRA, bottleneck and prefix-tuning directories): a request's
`model` field picks one by NAME (the base's own name picks the base), /v1/models lists
them with the base as `parent`, and rows of different adapters share one compiled step (a
prefix adapter's virtual tokens sit in pages of their own). With --max-loras K free slots,
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter
{"lora_name"} (vLLM's bodies) add and remove adapters while serving, without compiling
(an adapter must fit the slots: rank <= --max-lora-rank, modules in --lora-targets).
--prompt-lookup N,
--draft DIR (a smaller model, same vocabulary), --medusa or --mtp (the model's own heads),
with --spec-tokens γ, decode speculatively inside the continuous batch, each row accepting
its own count; /metrics then reports the acceptance rate and tokens per target forward. --mesh shards the weights and
the KV pages over this host's devices (tensor: heads and kv heads; expert: MoE experts).
Prints
"serving NAME on http://HOST:PORT" once it accepts connections (--port 0 picks a free
port, and the line tells which). SIGTERM or Ctrl-C stops accepting, lets running requests
finish for up to --shutdown-timeout seconds, cancels the rest and exits 0. Bad flags end
with one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every jaxlm CLI ends on bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m jaxlm.serve", description="Serve a jaxlm model over an "
                "OpenAI-compatible HTTP API.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="a local Hugging Face model directory")
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a `python -m jaxlm.train` run")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT adapter directory served as "
                   "the model itself (LoRA: merged)")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR", help="PEFT adapters "
                   "requests pick by `model` NAME (LoRA, bottleneck, prefix; unmerged)")
    p.add_argument("--max-loras", type=int, metavar="K", help="adapter slots (default: one "
                   "per --lora-modules); free ones take POST /v1/load_lora_adapter")
    p.add_argument("--max-lora-rank", type=int, metavar="R", help="the slots' LoRA rank "
                   "(default: the largest --lora-modules rank, else 16)")
    p.add_argument("--lora-targets", metavar="NAMES", help="modules the slots cover, e.g. "
                   "q_proj,k_proj,v_proj,o_proj (default: the --lora-modules' targets)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's)")
    from jaxlm.infer.cli import add_mesh_arg, add_quant_args, add_spec_args
    add_quant_args(p)
    add_spec_args(p)
    add_mesh_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--model-name", help="the model id clients send (default: the "
                   "directory's name)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV-cache pool size, e.g. 512MiB or 2GiB (default: the scheduler's)")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-batched-tokens", type=int, default=256,
                   help="tokens per model step (prefill chunks + decodes)")
    p.add_argument("--max-len", type=int, help="prompt + new tokens per request "
                   "(default: the model's max_position)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="refuse (HTTP 429) a request when this many are already waiting")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every step "
                   "shape before serving (the first requests then wait for compiles)")
    p.add_argument("--decode-steps", type=int, default=4, help="tokens per sequence per "
                   "device call while all sequences decode (1: one step per call)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def check_args(args) -> None:
    """The checks that need no model, so bad flags fail before anything loads."""
    for flag in ("page_size", "max_seqs", "max_batched_tokens", "decode_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2, got {args.max_len}")
    if args.kv_memory is not None:
        from jaxlm.model.memory import parse_bytes
        args.kv_memory = parse_bytes(args.kv_memory)
    from jaxlm.infer.cli import (check_mesh_arg, check_quant_args, check_source,
                                 check_spec_args)
    check_source(args)
    check_quant_args(args)
    check_spec_args(args)
    check_mesh_arg(args)
    from jaxlm.model.io.peft import read_peft_config
    if args.adapter:
        read_peft_config(args.adapter)
    args.lora_modules = lora_modules(args.lora_modules)
    for path in args.lora_modules.values():
        read_peft_config(path)
    if args.adapter and args.lora_modules:
        raise ValueError("--adapter makes one adapter the model itself; with --lora-modules "
                         "serve it as NAME=DIR too")
    for flag in ("max_loras", "max_lora_rank"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got "
                             f"{getattr(args, flag)}")
    if args.max_loras is not None and args.max_loras < len(args.lora_modules):
        raise ValueError(f"--max-loras {args.max_loras} is fewer than the "
                         f"{len(args.lora_modules)} --lora-modules")
    if args.adapter and args.max_loras:
        raise ValueError("--adapter makes one adapter the model itself; with --max-loras "
                         "serve adapters through --lora-modules")
    if args.model_name and args.model_name in args.lora_modules:
        raise ValueError(f"--lora-modules name {args.model_name!r} is the base model's "
                         f"--model-name; pick another")


def lora_modules(items) -> dict[str, str]:
    """--lora-modules NAME=DIR ... → {NAME: DIR}, each name once."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=DIR pairs, got {item!r}")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        out[name] = path
    return out


def load(args):
    """(lm, tokenizer or None, stop ids), with --adapter attached (a LoRA merged)."""
    from jaxlm.model.io.load import load as load_dir
    got = load_dir(args.checkpoint or args.hf, step=args.step, dtype=args.dtype)
    lm, tokenizer, stops = got.lm, got.tokenizer, got.stop_ids
    from jaxlm.model import peft
    if args.adapter:
        from jaxlm.model.io.peft import load_peft
        lm = load_peft(lm, args.adapter)
    # --adapter's LoRA, or a PEFT run's own: folded in, decode at base cost; over
    # quantized weights (a QLoRA run) it stays unmerged, as it was trained
    if peft.loras(lm) and lm.cfg.weight_quant is None:
        lm = peft.merge(lm)
    if args.quantize:   # the merged weights are the ones quantized
        from jaxlm.model.quant import quantize
        lm = quantize(lm, args.quantize, args.quant_group)
    return lm, tokenizer, stops


def build_app(args):
    from jaxlm.infer.scheduler import Scheduler

    from .app import create_app
    from .chat import load_template
    from jaxlm.infer.cli import speculative
    lm, tokenizer, stops = load(args)
    mesh = None
    if args.mesh:
        from jaxlm.model.sharding import make_mesh
        mesh = make_mesh(args.mesh)
    names = list(args.lora_modules)
    sched = Scheduler(lm, tokenizer=tokenizer, page_size=args.page_size,
                      kv_memory=args.kv_memory, max_seqs=args.max_seqs,
                      max_batched_tokens=args.max_batched_tokens, max_len=args.max_len,
                      decode_steps=args.decode_steps, cache_dtype=args.cache_dtype,
                      mesh=mesh, adapters=[args.lora_modules[n] for n in names] or None,
                      speculative=speculative(args, lm), max_adapters=args.max_loras,
                      max_lora_rank=args.max_lora_rank,
                      lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets
                      else None)
    print(f"KV cache: {sched.pool.n_pages} pages of {sched.page_size} tokens = "
          f"{sched.capacity_tokens} tokens", file=sys.stderr, flush=True)
    if not args.no_warmup:
        start = time.perf_counter()
        n = sched.warmup()
        print(f"compiled {n} step programs in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint or args.hf))
    # an HF directory's template, or the one a fine-tuned run kept (else the default)
    template = (load_template(args.hf or args.checkpoint) if tokenizer is not None
                else None)
    return create_app(sched, tokenizer=tokenizer, model_name=name, stop_tokens=stops,
                      chat_template=template, api_key=args.api_key,
                      max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout,
                      adapters={n: i for i, n in enumerate(names)}), name


def serve(args) -> None:
    import uvicorn
    app, name = build_app(args)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening now; --port 0 learns its port here
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {name} on http://{host}:{port}", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on")
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the
    # default handlers that would kill us (SIGTERM → status -15) after a clean stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise ValueError(f"could not serve on {args.host}:{args.port} (see the log above)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
