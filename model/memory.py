"""KV-cache memory planner: bytes per token and per context for MHA, GQA, MQA and MLA.

    python -m jaxlm.model.memory --preset llama3-70b --context 4096
    python -m jaxlm.model.memory --hf-config path/to/config.json --dtype bfloat16
    python -m jaxlm.model.memory --preset tiny --kv-memory 64MiB --page-size 16

Per token and layer a standard cache stores K and V: 2 · kv_heads · head_dim numbers
(MHA: kv_heads = heads; MQA: 1). MLA stores the latent and the shared RoPE key:
kv_lora_rank + qk_rope_head_dim numbers. What the same model would need as MHA is
shown beside it, so the saving is explicit.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .config import PRESETS, Config


def _numbers_per_token_layer(cfg: Config, layout: str) -> int:
    if layout == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if cfg.attention == "mla":  # the per-head K and V that MLA would otherwise cache
        k_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        k_dim = v_dim = cfg.dim_per_head
    heads = {"mha": cfg.n_heads, "gqa": cfg.num_kv_heads, "mqa": 1}[layout]
    return heads * (k_dim + v_dim)


def _scales_per_token_layer(cfg: Config, layout: str) -> int:
    """An int8 cache's scales: one per (token, kv head) for K and for V; MLA one per token
    (latent and RoPE key share it)."""
    if layout == "mla":
        return 1
    return 2 * {"mha": cfg.n_heads, "gqa": cfg.num_kv_heads, "mqa": 1}[layout]


def kv_bytes_per_token(cfg: Config, layout: str | None = None, dtype: str | None = None) -> int:
    """Cache bytes per token over all layers. layout: None (as configured), 'mha',
    'gqa', 'mqa' or 'mla'; dtype defaults to the config's compute dtype. dtype 'int8'
    counts the int8 values and their scales (in the compute dtype), as model.cache
    stores them."""
    if layout is None:
        layout = "mla" if cfg.attention == "mla" else "gqa"
    if layout not in ("mha", "gqa", "mqa", "mla"):
        raise ValueError(f"layout={layout!r}; choose mha, gqa, mqa or mla")
    itemsize = np.dtype(_np_dtype(dtype or cfg.dtype)).itemsize
    per_layer = _numbers_per_token_layer(cfg, layout) * itemsize
    if _np_dtype(dtype or cfg.dtype) == np.int8:
        per_layer += (_scales_per_token_layer(cfg, layout)
                      * np.dtype(_np_dtype(cfg.dtype)).itemsize)
    return cfg.n_layers * per_layer


def pages_for(cfg: Config, kv_memory: int, page_size: int, dtype: str | None = None) -> int:
    """Pages of `page_size` tokens (all layers) that `kv_memory` bytes hold: the paged
    cache's pool size (jaxlm.infer.scheduler, `--kv-memory`)."""
    per_page = kv_bytes_per_token(cfg, dtype=dtype) * page_size
    n = int(kv_memory) // per_page
    if n < 1:
        raise ValueError(f"kv_memory={kv_memory} bytes holds no page of {page_size} tokens "
                         f"({per_page} bytes a page); raise --kv-memory")
    return n


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' → bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1 << 10,
             "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    s = str(text).strip().lower()
    num = s.rstrip("kmgtib")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 512MiB, 2GiB or a "
                         f"byte count") from None
    if value <= 0:
        raise ValueError(f"a memory size must be > 0, got {text!r}")
    return int(value)


CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _np_dtype(name: str):
    import jax.numpy as jnp  # bfloat16 is known to numpy through ml_dtypes via jax
    if str(name) not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {name!r} is not one of {CACHE_DTYPES}")
    return jnp.dtype(name)


def plan(cfg: Config, context: int, dtype: str | None = None) -> list[dict]:
    """Rows of {layout, bytes_per_token, bytes_for_context} worth comparing for cfg."""
    layouts = ["mha", "mla"] if cfg.attention == "mla" else ["mha", "gqa", "mqa"]
    configured = "mla" if cfg.attention == "mla" else ("mha" if cfg.num_kv_heads == cfg.n_heads
                                                       else "gqa")
    rows = []
    for layout in layouts:
        per_token = kv_bytes_per_token(cfg, layout, dtype)
        rows.append({"layout": layout, "configured": layout == configured,
                     "bytes_per_token": per_token, "bytes_for_context": per_token * context})
    return rows


def _human(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.3g} {unit}"
    return f"{n / 1000:.3g} TB"


def format_table(name: str, cfg: Config, context: int, dtype: str | None = None) -> str:
    lines = [f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, "
             f"{'MLA' if cfg.attention == 'mla' else f'{cfg.num_kv_heads} kv heads'}, "
             f"{dtype or cfg.dtype}",
             f"{'layout':<8} {'per token':>12} {f'{context} tokens':>16}"]
    for row in plan(cfg, context, dtype):
        mark = " (as configured)" if row["configured"] else ""
        lines.append(f"{row['layout']:<8} {_human(row['bytes_per_token']):>12} "
                     f"{_human(row['bytes_for_context']):>16}{mark}")
    lines.append("bytes per token of the configured layout by cache dtype: " + ", ".join(
        f"{d} {kv_bytes_per_token(cfg, dtype=d)}" for d in CACHE_DTYPES))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxlm.model.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"one of {sorted(PRESETS)}")
    src.add_argument("--hf-config", help="a Hugging Face config.json")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--dtype", default=None, choices=CACHE_DTYPES,
                   help="cache dtype (default: the model's); int8 counts its scales too")
    p.add_argument("--kv-memory", help="a paged cache budget, e.g. 2GiB: prints the pages "
                   "and tokens it holds")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page (default 16)")
    args = p.parse_args(argv)
    try:
        if args.context < 1:
            raise ValueError(f"--context must be >= 1, got {args.context}")
        if args.preset:
            if args.preset not in PRESETS:
                raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
            name, cfg = args.preset, PRESETS[args.preset]
        else:
            from .io import config_from_hf
            try:
                with open(args.hf_config) as f:
                    hf = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read --hf-config {args.hf_config!r}: {e}") from None
            name, cfg = args.hf_config, config_from_hf(hf)
        print(format_table(name, cfg, args.context, args.dtype))
        if args.kv_memory:
            n = pages_for(cfg, parse_bytes(args.kv_memory), args.page_size, args.dtype)
            tokens = n * args.page_size
            print(f"--kv-memory {args.kv_memory}: {n} pages of {args.page_size} tokens = "
                  f"{tokens} tokens ({tokens // args.context} sequences of {args.context})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
