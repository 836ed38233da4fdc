"""The `esd-lora` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe, resume=args.resume, progress=not args.quiet)
    print(json.dumps(summary, indent=2))


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from .adapter import adapter_file, load_adapters
    from .models import load_pipeline
    from .sample import generate, save_png, to_pil_grid

    if args.n < 1:
        raise ValueError("--n must be >= 1")
    for path in args.adapter:
        adapter_file(path)  # a missing adapter fails before any image is made
    pipe = load_pipeline(args.model)
    seeds = list(range(args.seed, args.seed + args.n))
    images = generate(pipe, [args.prompt] * args.n, seeds, args.steps, args.guidance)
    rows = [images]
    if args.adapter:
        load_adapters(pipe, args.adapter)
        rows.append(generate(pipe, [args.prompt] * args.n, seeds, args.steps, args.guidance))
    grid = to_pil_grid(torch.cat(rows), cols=args.n, scale=args.scale)
    save_png(grid, args.out)
    if args.out_dir:
        for r, row in enumerate(rows):
            tag = "base" if r == 0 else "erased"
            for seed, img in zip(seeds, row):
                save_png(to_pil_grid(img[None], cols=1, pad=0), Path(args.out_dir) / f"{tag}_{seed:05d}.png")
    what = "base (top) and with adapters (bottom)" if args.adapter else "images"
    print(f"wrote {args.out}: {args.n} {what} for {args.prompt!r}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, format_report
    from .io import atomic_write_json, atomic_write_text
    from .sample import save_png

    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: no prompts in the file")
    report, grid = evaluate(args.model, args.adapter, args.concepts, prompts, args.n, args.seed, args.steps,
                            args.guidance)
    out = Path(args.out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", format_report(report))
    save_png(grid, out / "grid.png")
    print(format_report(report))


def _cmd_toy_build(args: argparse.Namespace) -> None:
    from .toy.build import BuildConfig, build

    cfg = BuildConfig(seed=args.seed, unet_steps=args.unet_steps)
    report = build(args.work, cfg, install=args.install)
    print(json.dumps({k: v for k, v in report.items() if k != "quality"}, indent=2))


def _cmd_toy_quality(args: argparse.Namespace) -> None:
    from .io import atomic_write_json
    from .toy.quality import format_table, quality_table

    table = quality_table(args.model, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance)
    print(format_table(table))
    if args.out:
        atomic_write_json(args.out, table)


def parser() -> argparse.ArgumentParser:
    from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p = argparse.ArgumentParser(prog="esd-lora", description="Erase concepts from diffusion models with LoRA.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="erase the concept of a YAML recipe; writes an adapter folder")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/toy/red.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate a grid of images with fixed seeds")
    s.add_argument("prompt")
    s.add_argument("--model", default="toy", help="`toy`, a diffusers folder or a hub id (default: toy)")
    s.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter folder or file (repeatable); adds a row with the adapters on, same seeds")
    s.add_argument("--n", type=int, default=8, help="images per row (default 8)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    s.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance (default {DEFAULT_GUIDANCE})")
    s.add_argument("--out", default="grid.png", help="grid PNG to write (default grid.png)")
    s.add_argument("--out-dir", help="also write every image as its own PNG here")
    s.add_argument("--scale", type=int, default=4, help="upscale factor of the grid (default 4)")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("eval", help="detection rates of concepts, base against erased, same seeds")
    e.add_argument("model", help="`toy` or a diffusers folder")
    e.add_argument("--adapter", action="append", default=[], help="adapter folder or file (repeatable)")
    e.add_argument("--concepts", nargs="+", required=True, help="the erased concepts")
    e.add_argument("--prompts", help="a file of prompts, one per line (default: built from the concepts)")
    e.add_argument("--n", type=int, default=64, help="images per prompt (default 64)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    e.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    e.set_defaults(func=_cmd_eval)

    toy = sub.add_parser("toy", help="the toy world: build it, measure it").add_subparsers(dest="toy", required=True)
    b = toy.add_parser("build", help="train the toy classifier, autoencoder and pipeline (about 90 min, 2 cores)")
    b.add_argument("--work", default="build/toy", help="work folder; finished stages are reused")
    b.add_argument("--install", action="store_true", help="copy the result into the package as the `toy` model")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--unet-steps", type=int, default=4000)
    b.set_defaults(func=_cmd_toy_build)
    q = toy.add_parser("quality", help="measure a toy pipeline's concept detection table")
    q.add_argument("--model", default="toy")
    q.add_argument("--n", type=int, default=32, help="images per prompt")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    q.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    q.add_argument("--out", help="also write the table as JSON here")
    q.set_defaults(func=_cmd_toy_quality)
    return p


def main(argv: list[str] | None = None) -> int:
    from .adapter import AdapterError, TargetError
    from .models import ModelLoadError
    from .recipe import RecipeError

    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (RecipeError, ModelLoadError, TargetError, AdapterError, ValueError, FileNotFoundError) as err:
        print(f"esd-lora: error: {err}", file=sys.stderr)
        return 2
    return 0
