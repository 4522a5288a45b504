"""The released BLIP3-o DiT (1.66B parameters, 8B config) on one GPU: training step and sampling latency.

    python bench/dit_released.py --device cuda                      # bf16 autocast over fp32 weights
    python bench/dit_released.py --device cuda --checkpointing      # with per-block gradient checkpointing

Training step = zero_grad + forward + flow-matching loss + backward + fused AdamW on the DiT (what stage 2
trains; the frozen backbone's forward is not included). Sampling = the official 30-step Euler sampler
with CFG (both branches in one batch). Prints ms/step, samples/s and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blip3o.models.dit import DiT, DiTConfig
from blip3o.transport import FlowMatchingConfig, flow_matching_loss, initial_noise, sample_euler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("8b", "4b", "tiny"), default="8b", help="tiny: a CPU smoke test")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = {"8b": DiTConfig.blip3o_8b, "4b": DiTConfig.blip3o_4b, "tiny": DiTConfig.tiny}[args.size]()
    dit = DiT(config).to(device)
    dit.gradient_checkpointing = args.checkpointing
    n_params = sum(p.numel() for p in dit.parameters())
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=device.type == "cuda")
    fm = FlowMatchingConfig()
    b, c, g = args.batch, config.in_channels, config.input_size
    x0 = torch.randn(b, c, g, g, device=device)  # (B, 1792, 8, 8)
    cond = torch.randn(b, 64, config.latent_embedding_size, device=device)  # (B, 64, H)
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.iters):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = flow_matching_loss(dit, x0, cond, generator, fm)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"DiT {args.size} ({n_params:,} params), batch {b}, bf16 autocast, checkpointing={args.checkpointing}: "
        f"train step {step * 1e3:.1f} ms = {b / step:.0f} samples/s, peak memory {peak:.1f} GiB, loss {loss.item():.4f}"
    )
    dit.eval()
    sb = args.sample_batch
    noise = initial_noise((sb, c, g, g), torch.Generator().manual_seed(1), device=device)
    cond_s = cond[:sb]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        sample_euler(dit, noise, cond_s, fm, steps=2)  # warm-up
        _sync(device)
        start = time.perf_counter()
        sample_euler(dit, noise, cond_s, fm)
        _sync(device)
    print(
        f"DiT {args.size} sampling: batch {sb}, {fm.sample_steps} Euler steps with CFG: {time.perf_counter() - start:.3f} s"
    )


if __name__ == "__main__":
    main()
