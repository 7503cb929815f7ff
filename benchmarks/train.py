"""Training speed: jaxlm's jitted train step vs transformers' LlamaForCausalLM + torch AdamW.

    python benchmarks/train.py [--preset tiny] [--batch 16] [--seq 128] [--steps 5] [--rounds 5]

The same model shape (a jaxlm preset and the equal LlamaConfig), the same batch of
random tokens, the same optimizer (AdamW, β=(0.9, 0.95), weight decay 0.1, global-norm
clipping at 1), float32 on CPU, both in this one process. Each side first runs two
untimed steps (compilation, allocator warm-up); then `rounds` alternating rounds of
`steps` steps each are timed, so a load change on a shared machine hits both sides,
and each side's fastest round counts (interference only ever slows a round down;
the median is printed too). MFU divides achieved model FLOP/s (6·N per token plus
causal attention) by the best square-matmul FLOP/s measured here, by jax and by torch.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from common import trainer


def jaxlm_side(cfg, batch_np, lr):
    from jaxlm.model.build import SplitModel
    from jaxlm.train.step import flops_per_token
    run, state = trainer(SplitModel.create(cfg, 0), batch_np, lr)
    return run, flops_per_token(cfg, state.params, batch_np.shape[1] - 1)


def torch_side(cfg, batch_np, lr, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                     intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
                     head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_position,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                     tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std)
    model = LlamaForCausalLM(hf).float().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.tensor(batch_np, dtype=torch.long)

    def run(n):
        for _ in range(n):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.loss.item()
    return run, model.config._attn_implementation


def matmul_peaks(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    import torch
    from jaxlm.train.report import measure_matmul_peak
    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return {"jax": measure_matmul_peak("float32", n, reps), "torch": 2.0 * n ** 3 / best}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from jaxlm.model import preset
    cfg = preset(args.preset)
    threads = os.cpu_count() or 1
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    lr = 1e-3

    run_jax, fpt = jaxlm_side(cfg, tokens, lr)
    run_torch, attn = torch_side(cfg, tokens, lr, threads)
    first = {"jaxlm": run_jax(2), "torch": run_torch(2)}  # warm-up (compile) steps
    times = {"jaxlm": [], "torch": []}
    peaks = {"jax": 0.0, "torch": 0.0}
    for _ in range(args.rounds):
        for name, run in (("jaxlm", run_jax), ("torch", run_torch)):
            t = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
        # The peak is re-measured every round too: a busy moment must not lower it.
        peaks = {k: max(v, peaks[k]) for k, v in matmul_peaks(threads).items()}
    peak = max(peaks.values())
    tok = args.batch * args.seq
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} CPU, {threads} cores "
          f"({platform.processor() or 'unknown'}) · jax {jax.__version__} · "
          f"{cfg.vocab_size}v/{cfg.d_model}d/{cfg.n_layers}L preset {args.preset!r}, "
          f"batch {args.batch}×{args.seq}, float32, torch attention {attn!r}")
    print(f"loss after 2 warm-up steps: jaxlm {first['jaxlm']:.4f}, torch {first['torch']:.4f}")
    print(f"matmul peak (2048³ f32): jax {peaks['jax'] / 1e9:.1f}, torch "
          f"{peaks['torch'] / 1e9:.1f} GFLOP/s → MFU denominator {peak / 1e9:.1f} GFLOP/s")
    rates, medians = {}, {}
    for name, ts in times.items():
        rates[name], medians[name] = tok / min(ts), tok / statistics.median(ts)
        print(f"{name:>6}: {min(ts) * 1000:8.1f} ms/step  {rates[name]:9,.0f} tokens/s  "
              f"MFU {rates[name] * fpt / peak:6.1%}   (rounds: "
              + ", ".join(f"{x * 1000:.0f}" for x in ts) + " ms)")
    print(f"ratio jaxlm / torch: {rates['jaxlm'] / rates['torch']:.2f}× tokens/s "
          f"(best rounds; medians give {medians['jaxlm'] / medians['torch']:.2f}×)")


if __name__ == "__main__":
    main()
