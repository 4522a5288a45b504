"""`blip3o generate`: text -> images with a trained model.

    blip3o generate "a red circle left of a blue square" -o out.png
    blip3o generate "a red circle" "two green triangles" --model runs/x/final -o samples/out.png \\
        --num-images 4 --seed 1 --grid --scale 4

Without --model, the model bundled with the package is used. One image (one prompt, --num-images 1) is
written to -o itself. Several images are written next to it, numbered in prompt-major order:
-o samples/out.png gives samples/out_000.png, samples/out_001.png, ... (with 2 prompts x 4 images,
out_000..out_003 are the first prompt's). --grid also writes a labelled contact sheet, samples/out_grid.png.
The same model, prompts, seed and settings give the same pixels. --self-check K draws K candidates for each
image and keeps the one the model's own understanding finds truest to the prompt (blip3o.eval.self_check).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model are imported only once the arguments are known to be good
    from PIL import Image

    from blip3o.models.blip3o import Blip3o

PROG = "blip3o generate"
MODEL_HELP = "model folder written by blip3o train, e.g. runs/x/final (default: the bundled model)"


class CliError(Exception):
    """A user error worth one line on stderr and exit code 2 (no traceback)."""


# ---- helpers shared with `blip3o ask` ---------------------------------------------------------------------


def report(prog: str, err: CliError) -> int:
    """Print a user error as one line (some library messages span several) and return the exit code, 2."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def quiet_libraries() -> None:
    """Silence transformers' and diffusers' per-load progress bars and advice (e.g. "install accelerate"):
    a command's output should be what it did, not how its dependencies load weights."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but CUDA is not available")
    return device


def _unreadable_weight_files(directory: Path) -> list[Path]:
    """The safetensors files under `directory` whose header does not parse (truncated, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    bad = []
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(path)
    return bad


def default_model() -> Path:
    """The bundled model's folder, or CliError saying how to get a model when this install has none."""
    from blip3o import bundled

    try:
        return bundled.bundled_model_dir()
    except bundled.NoBundledModelError as err:
        raise CliError(str(err)) from err


def load_model(path: Path | None, device: str = "auto") -> Blip3o:
    """`Blip3o.from_pretrained` with errors a user can act on (raised as CliError); None: the bundled model."""
    if path is None:
        path = default_model()
    if not path.exists():
        raise CliError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CliError(f"--model {path} is a file; pass the model folder (e.g. runs/x/final)")
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        raise CliError(f"{path} is a training run folder; its model is {path / 'final'}")
    device = resolve_device(device)
    quiet_libraries()
    from blip3o.models.blip3o import Blip3o, ModelLoadError

    try:
        model = Blip3o.from_pretrained(path)
    except ModelLoadError as err:
        # safetensors' own messages ("incomplete metadata, file not fully covered") do not say which of the
        # model's weight files is broken; find it so the user knows what to re-copy.
        bad = _unreadable_weight_files(path)
        if bad:
            names = ", ".join(str(p) for p in bad)
            raise CliError(
                f"corrupt model {path}: unreadable weight file {names} ({err.__cause__ or err})"
            ) from err
        raise CliError(str(err)) from err
    return model.to(device).eval()


GUIDANCE_INTERVAL_HELP = (
    "guide at full weight only for noise levels MIN..MAX (0 clean, 1 noise), elsewhere at 1 + OUTSIDE (w - 1), "
    "OUTSIDE 0 by default (Kynkaanniemi et al. 2024; default: the model's, usually every step)"
)

DECODER_CANDIDATES_HELP = (
    "decode each DiT sample K times and keep the decode whose CLIP reading agrees best with the sample (K times "
    "the decoder's work; default: the model's)"
)


COUNT_GUIDANCE_HELP = (
    "steer each sampling step towards as many objects of each shape as the prompt names, read by the model's own "
    "CLIP label head, with steps of this length (e.g. 10; default 0: off; models/count_guidance.py)"
)


def check_count_guidance(strength: float | None, model: Blip3o | None = None) -> None:
    """CliError unless --count-guidance is absent, or >= 0 and finite (called before the model is loaded), and
    with `model`: unless it can read counts (0 and absent need nothing)."""
    if strength is None:
        return
    if not math.isfinite(strength) or strength < 0:
        raise CliError(f"--count-guidance must be a finite number >= 0, got {strength}")
    if model is None or strength == 0:
        return
    from blip3o.models.count_guidance import check_count_reader

    try:
        check_count_reader(model.clip)
    except ValueError as err:
        raise CliError(f"--count-guidance: {err}") from err


def parse_guidance_interval(text: str) -> tuple[float, float, float]:
    """'MIN,MAX' or 'MIN,MAX,OUTSIDE' -> the interval's bounds and outside share; CliError for anything else."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values):
        raise CliError(f"--cfg-interval takes MIN,MAX or MIN,MAX,OUTSIDE such as 0.1,0.7, got {text!r}")
    low, high, outside = (*values, 0.0) if len(values) == 2 else values
    from blip3o.transport import FlowMatchingConfig

    try:  # the config's own bounds check, before the model is loaded
        FlowMatchingConfig(cfg_sigma_min=low, cfg_sigma_max=high, cfg_outside=outside)
    except ValueError as err:
        raise CliError(
            f"--cfg-interval needs 0 <= MIN <= MAX <= 1 and OUTSIDE in [0, 1], got {text!r}"
        ) from err
    return low, high, outside


def check_prompts(model: Blip3o, prompts: list[str]) -> None:
    """Reject user text that spells a special token before it reaches the model (it would change the layout
    of the sequence); the model raises a ValueError for it, which the CLI should not have to catch broadly."""
    from blip3o.data.tokenizer import reject_special_tokens

    for prompt in prompts:
        try:
            reject_special_tokens(model.tokenizer, prompt)
        except ValueError as err:
            raise CliError(str(err)) from err


def writable_file(path: Path) -> None:
    """Make `path`'s folder and check that the file can be written, before spending time on a model.

    Checked by writing (permission bits do not tell: root ignores them, /proc refuses anyway)."""
    if path.is_dir():
        raise CliError(f"output {path} is a folder; give a file name such as {path / 'out.png'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would only say "File exists"
        raise CliError(f"cannot write {path}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):  # appends nothing: an existing file is left as it is
                pass
        else:
            with open(path, "xb"):
                pass
            path.unlink()
    except OSError as err:
        raise CliError(f"cannot write {path}: {err.strerror or err}") from err


# ---- generate ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s), one set of images each")
    p.add_argument("--model", type=Path, help=MODEL_HELP)
    p.add_argument("-o", "--out", type=Path, default=Path("out.png"), help="output PNG (default out.png)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, help="DiT Euler steps (default: the model's)")
    p.add_argument("--cfg-scale", type=float, help="DiT guidance weight (default: the model's)")
    p.add_argument("--cfg-interval", metavar="MIN,MAX[,OUTSIDE]", help=GUIDANCE_INTERVAL_HELP)
    p.add_argument("--decoder-steps", type=int, help="pixel decoder steps (default: the model's)")
    p.add_argument("--decoder-cfg-scale", type=float, help="pixel decoder guidance weight")
    p.add_argument("--decoder-candidates", type=int, metavar="K", help=DECODER_CANDIDATES_HELP)
    p.add_argument("--count-guidance", type=float, metavar="S", help=COUNT_GUIDANCE_HELP)
    p.add_argument(
        "--scale", type=int, default=1, help="upscale saved images by this factor (nearest neighbour)"
    )
    p.add_argument("--grid", action="store_true", help="also write a labelled grid, <out>_grid.png")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once (default 64)")
    p.add_argument(
        "--self-check",
        type=int,
        default=1,
        metavar="K",
        help="draw K candidates per image and keep the one whose answers to the prompt's own questions (how many "
        "shapes, which shape is the red one) the model's understanding finds likeliest (default 1: off)",
    )
    p.add_argument(
        "--self-check-accept",
        type=float,
        metavar="P",
        help="with --self-check K: draw candidates one round at a time and stop at the first the model believes "
        "(joint probability of the prompt's answers >= P, e.g. 0.25); default: always draw all K",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    return p


def check_accept(accept: float | None, self_check: int | None) -> None:
    """CliError unless --self-check-accept is absent, or a probability in (0, 1] given with --self-check > 1."""
    if accept is None:
        return
    if not 0 < accept <= 1:
        raise CliError(f"--self-check-accept must be a probability in (0, 1], got {accept}")
    if (self_check or 1) < 2:
        raise CliError("--self-check-accept needs --self-check K with K >= 2 (the most candidates to draw)")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in (
        "num_images",
        "steps",
        "decoder_steps",
        "decoder_candidates",
        "scale",
        "batch_size",
        "self_check",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("cfg_scale", "decoder_cfg_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CliError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    check_accept(args.self_check_accept, args.self_check)
    check_count_guidance(args.count_guidance)


def output_paths(out: Path, n_images: int) -> list[Path]:
    """Where the images go: `out` itself for one image, else out_000.png, out_001.png, ... beside it."""
    if n_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n_images)]


def grid_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_grid{out.suffix}")


def _grid(
    images: list[Image.Image], prompts: list[str], num_images: int, scale: int, title: str
) -> Image.Image:
    from blip3o.viz import image_grid

    # Prompt-major, as Blip3o.generate returns them; "#k" tells a prompt's images apart.
    labels = [
        prompt if num_images == 1 else f"{prompt} #{k}" for prompt in prompts for k in range(num_images)
    ]
    # One row per prompt when each has several images; otherwise rows of up to 8.
    columns = num_images if num_images > 1 and len(prompts) > 1 else min(8, len(images))
    cell = max(128, images[0].width * scale)
    return image_grid(images, labels, columns=columns, cell=cell, title=title)


def _run(args: argparse.Namespace) -> None:
    _check_numbers(args)
    interval = parse_guidance_interval(args.cfg_interval) if args.cfg_interval is not None else None
    from PIL import Image

    paths = output_paths(args.out, len(args.prompts) * args.num_images)
    if args.out.suffix.lower() not in Image.registered_extensions() and not args.out.is_dir():
        raise CliError(f"cannot tell the image format of {args.out}: give a name ending in .png")
    writable_file(paths[0])

    start = time.perf_counter()
    model = load_model(args.model, args.device)
    if interval is not None:
        model.set_guidance_interval(*interval)
    if args.decoder_candidates is not None:
        model.set_decoder_candidates(args.decoder_candidates)
    check_prompts(model, args.prompts)
    check_count_guidance(args.count_guidance, model)
    loaded = time.perf_counter()
    sampling = {
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "decoder_steps": args.decoder_steps,
        "decoder_cfg_scale": args.decoder_cfg_scale,
        "batch_size": args.batch_size,
        "count_guidance": args.count_guidance or 0.0,
    }
    from blip3o.eval.self_check import generate_self_checked, prompt_checks

    if args.self_check > 1 and (unchecked := [p for p in args.prompts if not prompt_checks(p)]):
        print(
            f"--self-check: no checks read from {unchecked} (no '<number> [colour] <shape>'): first candidate kept"
        )
    # One candidate (the default) is generate() itself.
    images, _ = generate_self_checked(
        model, args.prompts, args.self_check, args.num_images, args.seed, args.self_check_accept, **sampling
    )
    generated = time.perf_counter()

    scaled = [
        im.resize((im.width * args.scale, im.height * args.scale), Image.Resampling.NEAREST)
        if args.scale > 1
        else im
        for im in images
    ]
    written = list(zip(paths, scaled, strict=True))
    if args.grid:
        title = f"seed {args.seed}" + (f", {args.steps} steps" if args.steps else "")
        written.append((grid_path(args.out), _grid(images, args.prompts, args.num_images, args.scale, title)))
    for path, image in written:
        try:
            image.save(path)
        except OSError as err:
            raise CliError(f"cannot write {path}: {err}") from err
        print(f"wrote {path} ({image.width}x{image.height})")
    checked = f", count guidance {args.count_guidance:g}," if args.count_guidance else ""
    if args.self_check > 1 and args.self_check_accept is not None:
        checked += (
            f", each the first of up to {args.self_check} the model's self-check believes "
            f"(p >= {args.self_check_accept}),"
        )
    elif args.self_check > 1:
        checked += f", each the best of {args.self_check} by the model's self-check,"
    print(
        f"{len(images)} image(s){checked} in {generated - loaded:.1f} s "
        f"(model loaded in {loaded - start:.1f} s, {model.device})"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except CliError as err:
        return report(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
