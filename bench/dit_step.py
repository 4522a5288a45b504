"""Time our DiT next to diffusers' LuminaNextDiT2DModel at the same size: training step and inference.

Both models get width 512, 8 layers, 8 heads, an 8x8 grid (64 tokens) of 64 channels, patch size 1 and
64 condition tokens of width 512; diffusers' FFN multiplier is set so both FFNs are 2048 wide. The
training step is zero_grad + forward + MSE to a random target + backward (no optimizer); inference is a
forward under inference_mode. bfloat16 means autocast over fp32 weights (the training setting).

CPU (the default: 2 threads, float32, batch 16):
    .venv/bin/python bench/dit_step.py
GPU:
    .venv/bin/python bench/dit_step.py --device cuda --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from blip3o.models.dit import DiT, DiTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--grid", type=int, default=8, help="side of the token grid (patch size 1)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--cond-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations; the median is reported")
    return parser.parse_args(argv)


def interleaved_median_ms(
    steps: dict[str, Callable[[], None]], warmup: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds of each step, timed in alternation (order flipped every round) so that load from
    other processes on a shared machine hits every contender alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(iters):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def build_diffusers(args: argparse.Namespace, ffn_inner_dim: int) -> LuminaNextDiT2DModel:
    # diffusers sizes its FFN as int(8 * dim / 3) * multiplier, rounded up to multiple_of; match ours.
    base_inner = int(4 * 2 * args.dim / 3)
    model = LuminaNextDiT2DModel(
        sample_size=args.grid,
        patch_size=1,
        in_channels=args.channels,
        hidden_size=args.dim,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        num_kv_heads=args.heads,
        multiple_of=256,
        ffn_dim_multiplier=ffn_inner_dim / base_inner,
        norm_eps=1e-5,
        learn_sigma=False,
        qk_norm=True,
        cross_attention_dim=args.dim,
    )
    with torch.no_grad():
        model.pad_token.zero_()  # left uninitialised by diffusers (and unused in forward)
    got = model.layers[0].feed_forward.linear_1.out_features
    if got != ffn_inner_dim:
        raise RuntimeError(f"diffusers FFN is {got} wide, ours {ffn_inner_dim}; adjust the multiplier")
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    head_dim = args.dim // args.heads

    config = DiTConfig(input_size=args.grid, patch_size=1, in_channels=args.channels, dim=args.dim,
                       n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                       latent_embedding_size=args.dim)  # fmt: skip
    ours = DiT(config).to(device)
    theirs = build_diffusers(args, config.ffn_inner_dim).to(device)

    b, grid = args.batch, args.grid
    x = torch.randn(b, args.channels, grid, grid, device=device)
    target = torch.randn_like(x)
    timestep = torch.rand(b, device=device) * 1000
    condition = torch.randn(b, args.cond_len, args.dim, device=device)
    mask = torch.ones(b, args.cond_len, device=device)
    rope = get_2d_rotary_pos_embed_lumina(head_dim, grid, grid).to(device)  # complex (grid, grid, E/2)

    def forward_ours() -> torch.Tensor:
        return ours(x, timestep, condition)

    def forward_theirs() -> torch.Tensor:
        return theirs(x, timestep, condition, mask, rope, cross_attention_kwargs={}).sample

    def train_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = forward()
            F.mse_loss(out.float(), target).backward()

        return step

    def infer_step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
            ):
                forward()

        return step

    models = {"ours": (ours, forward_ours), "diffusers": (theirs, forward_theirs)}
    for model, _ in models.values():
        model.train()
    train_ms = interleaved_median_ms(
        {name: train_step(model, forward) for name, (model, forward) in models.items()},
        args.warmup,
        args.iters,
        device,
    )
    for model, _ in models.values():
        model.eval()
    infer_ms = interleaved_median_ms(
        {name: infer_step(forward) for name, (_, forward) in models.items()}, args.warmup, args.iters, device
    )
    results = {
        name: {
            "train": train_ms[name],
            "infer": infer_ms[name],
            "params": sum(p.numel() for p in m.parameters()),
        }
        for name, (m, _) in models.items()
    }

    print(
        f"DiT step bench: device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
        f"batch {b}, width {args.dim}, layers {args.layers}, heads {args.heads}, grid {grid}x{grid} "
        f"({grid * grid} tokens), channels {args.channels}, condition {args.cond_len}x{args.dim}, "
        f"FFN {config.ffn_inner_dim}, median of {args.iters} interleaved rounds after {args.warmup} warm-up"
    )
    print(f"{'model':<12}{'params':>14}{'train ms/step':>16}{'infer ms/fwd':>15}")
    for name, r in results.items():
        print(f"{name:<12}{r['params']:>14,}{r['train']:>16.2f}{r['infer']:>15.2f}")
    print(
        f"ratio ours/diffusers: train {results['ours']['train'] / results['diffusers']['train']:.3f}, "
        f"infer {results['ours']['infer'] / results['diffusers']['infer']:.3f} (below 1 = ours faster)"
    )
    print("param difference: ours adds the condition projection MLP (latent -> width), as the release does")


if __name__ == "__main__":
    main()
