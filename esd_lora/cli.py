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
    summary = train(recipe, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
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
    print(f"wrote {args.out}: {args.n} {what} for {args.prompt!r} ({args.steps} steps of "
          f"{type(pipe.scheduler).__name__}, guidance {args.guidance})")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: no prompts in the file")
    report, grid = evaluate(args.model, args.adapter, args.concepts, prompts, args.n, args.seed, args.steps,
                            args.guidance, erased_model=args.erased_model, clip=args.clip, kept=args.kept,
                            erased_from=args.erased_from)
    _write_report(report, grid, Path(args.out))


def _write_report(report: dict, grid, out: Path) -> None:
    from .evaluate import format_report
    from .io import atomic_write_json, atomic_write_text
    from .sample import save_png

    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", format_report(report))
    save_png(grid, out / "grid.png")
    print(format_report(report))


def _cmd_merge(args: argparse.Namespace) -> None:
    from .merge import merge

    out = merge(args.base, args.adapters, args.out, args.weights, args.single_file, args.allow_pickle, args.dtype,
                args.overwrite)
    print(f"wrote {out}" + (f" and {args.single_file}" if args.single_file else ""))


def _cmd_stack(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, named_concepts
    from .recipe import load_recipe
    from .stack import stack

    training = args.strategy in ("sequential", "joint")
    recipes = [load_recipe(r) for r in args.inputs] if training else []
    preserve = Path(args.preserve).read_text().splitlines() if args.preserve else []
    out, folded = stack(args.base, args.strategy, args.out, [] if training else args.inputs, recipes,
                        args.weights, [p.strip() for p in preserve if p.strip()], overwrite=args.overwrite)
    print(f"wrote {out}")
    if args.report:
        concepts = args.concepts or list(dict.fromkeys(
            c for f in folded for p in f.record.concepts for c in named_concepts(p)))
        report, grid = evaluate(args.base, [], concepts, n=args.n, erased_model=str(out))
        _write_report(report, grid, out.with_name(out.name + "-report"))


def _cmd_verify(args: argparse.Namespace) -> None:
    from .merge import verify

    result = verify(args.merged, args.base, args.adapters, args.weights, args.allow_pickle)
    worst = sorted(result["tensors"].items(), key=lambda kv: -kv[1])[: args.top]
    print(f"{len(result['tensors'])} tensors compared; largest |difference| {result['max_abs_diff']:.3g} "
          f"({result['worst_tensor']})")
    for name, diff in worst:
        print(f"  {diff:.3g}  {name}")
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, result)
    if result["max_abs_diff"] > args.tolerance:
        raise ValueError(f"{args.merged} differs from the recomputed merge by {result['max_abs_diff']:.3g} "
                         f"(> {args.tolerance})")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_adapter

    print(f"wrote {export_adapter(args.adapter, args.out, args.format)}")


def _cmd_toy_build(args: argparse.Namespace) -> None:
    from .toy.build import BuildConfig, build

    cfg = BuildConfig(seed=args.seed, unet_steps=args.unet_steps, unet_extra_steps=args.unet_extra_steps)
    report = build(args.work, cfg, install=args.install)
    print(json.dumps({k: v for k, v in report.items() if k != "quality"}, indent=2))


def _cmd_toy_quality(args: argparse.Namespace) -> None:
    from .io import atomic_write_json
    from .toy.quality import format_table, quality_table

    table = quality_table(args.model, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance)
    print(format_table(table))
    if args.out:
        atomic_write_json(args.out, table)


def _cmd_toy_figure(args: argparse.Namespace) -> None:
    from .toy.figure import save_figure

    print(f"wrote {save_figure(args.out, args.model)}")


def parser() -> argparse.ArgumentParser:
    from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p = argparse.ArgumentParser(prog="esd-lora", description="Erase concepts from diffusion models with LoRA.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="erase the concept of a YAML recipe; writes an adapter folder")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/toy/red.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true", help="replace an adapter already in the output folder")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate a grid of images with fixed seeds")
    s.add_argument("prompt")
    s.add_argument("--model", default="toy", help="`toy`, a diffusers folder or a hub id (default: toy)")
    s.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter folder or file (repeatable); adds a row with the adapters on, same seeds")
    s.add_argument("--n", type=int, default=8, help="images per row (default 8)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps of the model's own scheduler (default {DEFAULT_STEPS})")
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
    e.add_argument("--erased-from", nargs="+", default=[],
                   help="the concepts count as erased only in prompts naming one of these subjects (erase_from)")
    e.add_argument("--clip", help="score with this CLIP model (folder or hub id) instead of the toy classifier")
    e.add_argument("--kept", nargs="+", default=[], help="with --clip: concepts that must survive (the alternatives)")
    e.add_argument("--erased-model", help="measure this (merged) model against MODEL instead of MODEL + adapters")
    e.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("merge", help="fold adapters into the base weights; write a diffusers pipeline folder")
    m.add_argument("adapters", nargs="+", help="adapter folders or files")
    m.add_argument("--base", default="toy", help="`toy`, a diffusers folder or a hub id (default: toy)")
    m.add_argument("--out", required=True, help="pipeline folder to write")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1)")
    m.add_argument("--single-file", help="also write the original SD layout to this .safetensors")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="stored dtype (default fp32)")
    m.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle (.ckpt/.bin) base")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out / --single-file")
    m.set_defaults(func=_cmd_merge)

    st = sub.add_parser("stack", help="several erasures in one model: sum, fuse, sequential or joint")
    st.add_argument("inputs", nargs="+", help="adapters (sum, fuse) or recipes (sequential, joint)")
    st.add_argument("--strategy", default="sum", choices=["sum", "fuse", "sequential", "joint"])
    st.add_argument("--base", default="toy")
    st.add_argument("--out", required=True, help="pipeline folder to write")
    st.add_argument("--weights", type=float, nargs="+", help="sum: one weight per adapter (default 1)")
    st.add_argument("--preserve", help="fuse: a file of prompts whose outputs must not change, one per line")
    st.add_argument("--report", action="store_true",
                    help="measure every erased and kept concept, base against stacked (<out>-report/)")
    st.add_argument("--concepts", nargs="+", help="erased concepts for the report (default: from the adapters)")
    st.add_argument("--n", type=int, default=64, help="report: images per prompt (default 64)")
    st.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    st.set_defaults(func=_cmd_stack)

    v = sub.add_parser("verify", help="recompute a merge and report the largest difference per tensor")
    v.add_argument("merged", help="the merged pipeline folder")
    v.add_argument("--base", default="toy")
    v.add_argument("--adapters", nargs="+", default=[], help="the adapters it should contain")
    v.add_argument("--weights", type=float, nargs="+")
    v.add_argument("--tolerance", type=float, default=1e-5, help="fail above this |difference| (default 1e-5)")
    v.add_argument("--top", type=int, default=5, help="show this many largest differences")
    v.add_argument("--json", help="also write every tensor's difference as JSON here")
    v.add_argument("--allow-pickle", action="store_true")
    v.set_defaults(func=_cmd_verify)

    x = sub.add_parser("export", help="write an adapter as a kohya (A1111, ComfyUI) or diffusers LoRA file")
    x.add_argument("adapter", help="adapter folder or file")
    x.add_argument("--format", default="kohya", choices=["kohya", "diffusers"])
    x.add_argument("--out", required=True, help=".safetensors file to write")
    x.set_defaults(func=_cmd_export)

    toy = sub.add_parser("toy", help="the toy world: build it, measure it").add_subparsers(dest="toy", required=True)
    b = toy.add_parser("build", help="train the toy classifier, autoencoder and pipeline (about 90 min, 2 cores)")
    b.add_argument("--work", default="build/toy", help="work folder; finished stages are reused")
    b.add_argument("--install", action="store_true", help="copy the result into the package as the `toy` model")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--unet-steps", type=int, default=4000)
    b.add_argument("--unet-extra-steps", type=int, default=4000,
                   help="further training from the --unet-steps pipeline, on a fresh lr cycle (0: none)")
    b.set_defaults(func=_cmd_toy_build)
    q = toy.add_parser("quality", help="measure a toy pipeline's concept detection table")
    q.add_argument("--model", default="toy")
    q.add_argument("--n", type=int, default=32, help="images per prompt")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    q.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    q.add_argument("--out", help="also write the table as JSON here")
    q.set_defaults(func=_cmd_toy_quality)
    f = toy.add_parser("figure", help="renders beside the model's samples for the same captions (the README figure)")
    f.add_argument("--model", default="toy")
    f.add_argument("--out", default="docs/toy_world.png")
    f.set_defaults(func=_cmd_toy_figure)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import EsdLoraError

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides may follow flags: `train r.yaml --quiet train.steps=10`
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    diffusers_logging.disable_progress_bar()  # loading bars would bury a one-line error; work bars stay
    transformers_logging.disable_progress_bar()
    try:
        args.func(args)
    except (EsdLoraError, ValueError, FileNotFoundError) as err:
        print(f"esd-lora: error: {err}", file=sys.stderr)
        return 2
    return 0
