"""The `esd-lora` command: a thin layer over the Python API.

A user error (`errors.EsdLoraError`, or a flag argparse refuses) is one line on stderr and exit code 2;
`--debug` or `ESD_LORA_DEBUG=1` adds its traceback. Anything else is a bug: it is reported as one, with
its traceback, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    from .io import check_output
    from .models import load_pipeline
    from .objective import adapters_off
    from .sample import generate, save_png, to_pil_grid

    files = [adapter_file(path) for path in args.adapter]  # a missing adapter fails before any image is made
    check_output(args.out, files, True, "--out", folder=False)
    if args.out_dir:
        check_output(args.out_dir, files, True, "--out-dir")
    pipe = load_pipeline(args.model)
    if args.adapter:
        load_adapters(pipe, args.adapter)  # checked against this base before any image is made
    seeds = list(range(args.seed, args.seed + args.n))
    with adapters_off(pipe.unet, pipe.text_encoder):  # the base row: every adapter off, the text encoder's too
        rows = [generate(pipe, [args.prompt] * args.n, seeds, args.steps, args.guidance)]
    if args.adapter:
        rows.append(generate(pipe, [args.prompt] * args.n, seeds, args.steps, args.guidance))
    save_png(to_pil_grid(torch.cat(rows), cols=args.n, scale=args.scale), args.out)
    if args.out_dir:
        for r, row in enumerate(rows):
            tag = "base" if r == 0 else "erased"
            for seed, img in zip(seeds, row):
                save_png(to_pil_grid(img[None], cols=1, pad=0), Path(args.out_dir) / f"{tag}_{seed:05d}.png")
    what = "base (top) and with adapters (bottom)" if args.adapter else "images"
    print(f"wrote {args.out}: {args.n} {what} for {args.prompt!r} ({args.steps} steps of "
          f"{type(pipe.scheduler).__name__}, guidance {args.guidance})")


def _scorer(model: str, clip: str | None, erased: list[str], kept: list[str]):
    """CLIP over the erased and kept concepts, or the model's own scorer (the toy classifier for `toy`)."""
    from .evaluate import ClipScorer, model_scorer

    return ClipScorer(clip, list(dict.fromkeys([*erased, *kept]))) if clip else model_scorer(model)


def _read_prompts(path: str, flag: str) -> list[str]:
    """The non-empty lines of a prompt file."""
    from .errors import EsdLoraError

    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise EsdLoraError(f"{flag} {path}: cannot read it as text ({type(err).__name__})") from None
    if not prompts:
        raise EsdLoraError(f"{flag} {path}: no prompts in the file")
    return prompts


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    from .adapter import adapter_provenance
    from .io import check_output

    check_output(args.out, args.adapter, True, "--out")
    for path in args.adapter:
        adapter_provenance(path)  # a missing or unreadable adapter fails before anything loads
    prompts = _read_prompts(args.prompts, "--prompts") if args.prompts else None
    scorer = _scorer(args.model, args.clip, args.concepts, args.kept)
    report, grid = evaluate(args.model, args.adapter, args.concepts, scorer, prompts, args.n, args.seed, args.steps,
                            args.guidance, erased_model=args.erased_model, erased_from=args.erased_from,
                            held_out=args.held_out)
    _write_report(report, grid, Path(args.out))


def _write_report(report: dict, grid, out: Path) -> None:
    from .evaluate import format_report
    from .io import atomic_write_json, atomic_write_text
    from .sample import save_png

    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", format_report(report))
    save_png(grid, out / "grid.png")
    print(format_report(report))


def _cmd_attack(args: argparse.Namespace) -> None:
    from .adapter import adapter_provenance
    from .attack import AttackSettings, attack, format_report
    from .errors import EsdLoraError
    from .io import atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text, check_output
    from .sample import save_png

    check_output(args.out, [*args.adapter, *([args.erased_model] if args.erased_model else [])], args.overwrite,
                 "--out")
    for path in args.adapter:
        adapter_provenance(path)  # a missing or unreadable adapter fails before anything loads
    candidates = _read_prompts(args.prompts, "--prompts") if args.prompts else None
    if args.images and not Path(args.images).is_dir():
        raise EsdLoraError(f"--images {args.images}: no such folder")
    if any(step > args.attack_steps for step in args.measure_at or []):
        raise EsdLoraError(f"--measure-at: every step must be <= --attack-steps {args.attack_steps}")
    scorer = _scorer(args.model, args.clip, [args.concept], args.kept)
    settings = AttackSettings(
        concept=args.concept, methods=list(dict.fromkeys(args.method)), steps=args.attack_steps, lr=args.lr,
        tokens=args.tokens, init=args.init, batch=args.batch, measure_at=args.measure_at or [], images=args.images,
        candidates=args.candidates, n=args.n, seed=args.seed, repeats=args.repeats, sampling_steps=args.steps,
        guidance=args.guidance)
    report, grid, tokens = attack(args.model, args.adapter, scorer, settings, args.erased_model, candidates)
    with atomic_dir(args.out) as tmp:
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", format_report(report))
        save_png(grid, tmp / "grid.png")
        for method, vectors in tokens.items():
            atomic_save_safetensors(vectors, tmp / f"tokens_{method}.safetensors")
    print(format_report(report))


def _cmd_merge(args: argparse.Namespace) -> None:
    from .merge import merge

    out = merge(args.base, args.adapters, args.out, args.weights, args.single_file, args.allow_pickle, args.dtype,
                args.overwrite)
    print(f"wrote {out}" + (f" and {args.single_file}" if args.single_file else ""))


def _cmd_stack(args: argparse.Namespace) -> None:
    from .errors import EsdLoraError
    from .evaluate import evaluate
    from .io import check_output
    from .recipe import load_recipe
    from .stack import stack

    if args.report and args.clip and not args.concepts:
        raise EsdLoraError("--report with --clip: name the erased concepts (--concepts) and the kept ones (--kept)")
    scorer = _scorer(args.base, args.clip, args.concepts or [], args.kept) if args.report else None
    check_output(args.out, [*args.inputs, *([args.preserve] if args.preserve else [])], args.overwrite, "--out")
    training = args.strategy in ("sequential", "joint")
    recipes = [load_recipe(r) for r in args.inputs] if training else []
    preserve = _read_prompts(args.preserve, "--preserve") if args.preserve else []
    out, folded = stack(args.base, args.strategy, args.out, [] if training else args.inputs, recipes,
                        args.weights, preserve, overwrite=args.overwrite)
    print(f"wrote {out}")
    if scorer is not None:
        concepts = args.concepts or list(dict.fromkeys(
            c for f in folded for p in f.record.concepts for c in scorer.concepts(p)))
        report, grid = evaluate(args.base, [], concepts, scorer, n=args.n, erased_model=str(out))
        _write_report(report, grid, out.with_name(out.name + "-report"))


def _cmd_verify(args: argparse.Namespace) -> None:
    from .errors import EsdLoraError
    from .merge import verify

    if args.json:
        from .io import check_output

        check_output(args.json, [args.merged, *args.adapters], True, "--json", folder=False)
    result = verify(args.merged, args.base, args.adapters, args.weights, args.allow_pickle)
    worst = sorted(result["tensors"].items(), key=lambda kv: -kv[1])[: args.top]
    print(f"{len(result['tensors'])} tensors compared; largest |difference| {result['max_abs_diff']:.3g} "
          f"({result['worst_tensor']})")
    for name, diff in worst:
        print(f"  {diff:.3g}  {name}")
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, result)
    if not result["max_abs_diff"] <= args.tolerance:
        raise EsdLoraError(f"{args.merged} differs from the recomputed merge by {result['max_abs_diff']:.3g} "
                           f"(> {args.tolerance})")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_adapter

    print(f"wrote {export_adapter(args.adapter, args.out, args.format, args.overwrite)}")


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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other error of the command."""

    def error(self, message: str):
        print(f"esd-lora: error: {self.prog.removeprefix('esd-lora ')}: {message}", file=sys.stderr)
        sys.exit(2)


def number(kind: type = float, low: float | None = None, high: float | None = None):
    """An argparse type: a finite int or float within [low, high]."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}" if low is not None else "finite"
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value
    return parse


def _sampling_flags(p: argparse.ArgumentParser, n: int) -> None:
    from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p.add_argument("--n", type=number(int, 1, 100_000), default=n, help=f"images per prompt (default {n})")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0, help="seed of the first image; image i "
                   "uses seed+i")
    p.add_argument("--steps", type=number(int, 1, 1000), default=DEFAULT_STEPS,
                   help=f"sampling steps of the model's own scheduler (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=number(float, 0, 100), default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance (default {DEFAULT_GUIDANCE})")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="erase the concept of a YAML recipe; writes an adapter folder")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/toy/red.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true", help="replace an adapter already in the output folder")
    t.set_defaults(func=_cmd_train)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="generate a grid of images with fixed seeds")
    s.add_argument("prompt")
    s.add_argument("--model", default="toy", help="`toy`, a diffusers folder or a hub id (default: toy)")
    s.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter folder or file (repeatable); adds a row with the adapters on, same seeds")
    _sampling_flags(s, 8)
    s.add_argument("--out", default="grid.png", help="grid PNG to write (default grid.png)")
    s.add_argument("--out-dir", help="also write every image as its own PNG here")
    s.add_argument("--scale", type=number(int, 1, 32), default=4, help="upscale factor of the grid (default 4)")
    s.set_defaults(func=_cmd_sample)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="detection rates of concepts, base against erased, same seeds")
    e.add_argument("model", help="`toy` or a diffusers folder")
    e.add_argument("--adapter", action="append", default=[], help="adapter folder or file (repeatable)")
    e.add_argument("--concepts", nargs="+", required=True, help="the erased concepts")
    e.add_argument("--prompts", help="a file of prompts, one per line (default: built from the concepts)")
    e.add_argument("--held-out", type=number(int, 0, 10_000), default=24,
                   help="without --prompts: held-out prompts per erased concept, where the scorer makes them "
                        "(the toy's: caption templates, synonyms and other kinds' words; default 24, 0: none)")
    _sampling_flags(e, 64)
    e.add_argument("--erased-from", nargs="+", default=[],
                   help="the concepts count as erased only in prompts naming one of these subjects (erase_from)")
    e.add_argument("--clip", help="score with this CLIP model (folder or hub id) instead of the model's own scorer")
    e.add_argument("--kept", nargs="+", default=[], help="with --clip: concepts that must survive (the alternatives)")
    e.add_argument("--erased-model", help="measure this (merged) model against MODEL instead of MODEL + adapters")
    e.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    e.set_defaults(func=_cmd_eval)


def _add_attack(sub) -> None:
    from .attack import METHODS

    a = sub.add_parser("attack", help="a robustness audit: try to bring an erased concept back (prompt search, "
                                      "textual inversion, soft prompt)")
    a.add_argument("model", help="the base model: `toy`, a diffusers folder or a hub id")
    a.add_argument("--adapter", action="append", default=[], help="erasure adapter folder or file (repeatable)")
    a.add_argument("--erased-model", help="attack this (merged) model instead of MODEL + adapters")
    a.add_argument("--concept", required=True, help="the erased concept, as the scorer names it")
    a.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), help="attacks to run (default: all)")
    a.add_argument("--attack-steps", type=number(int, 1, 1_000_000), default=400,
                   help="ti / soft-prompt: optimisation steps (default 400)")
    a.add_argument("--lr", type=number(float, 1e-8, 10), default=5e-3, help="ti / soft-prompt: Adam lr (default 5e-3)")
    a.add_argument("--tokens", type=number(int, 1, 16), default=1, help="ti / soft-prompt: learned tokens (default 1)")
    a.add_argument("--init", help="ti: the word the tokens start from (default: the concept)")
    a.add_argument("--batch", type=number(int, 1, 4096), default=16, help="ti / soft-prompt: batch (default 16)")
    a.add_argument("--measure-at", type=number(int, 0, 1_000_000), nargs="+",
                   help="steps at which the rate is measured, 0 before any (default: 0, 1/8, 1/4 and 1/2 of "
                        "--attack-steps; the last step always)")
    a.add_argument("--images", help="ti / soft-prompt: a folder of images of the concept to fit the tokens to "
                                    "(default: ti, the model's renders where it has them; else the base's samples)")
    a.add_argument("--prompts", help="prompts: a file of candidate prompts (default: the scorer's held-out prompts)")
    a.add_argument("--candidates", type=number(int, 1, 100_000), default=128,
                   help="prompts: how many of the scorer's prompts to try (default 128)")
    _sampling_flags(a, 32)
    a.add_argument("--repeats", type=number(int, 1, 1000), default=1,
                   help="run each attack at this many seeds (--seed, --seed+1, ...: other target images, batches "
                        "and measured images) and report the one that did best, with every seed's rate (default 1)")
    a.add_argument("--clip", help="score with this CLIP model (folder or hub id) instead of the model's own scorer")
    a.add_argument("--kept", nargs="+", default=[], help="with --clip: other concepts, the alternatives")
    a.add_argument("--out", required=True, help="folder for report.json, report.md, grid.png and the learned tokens")
    a.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    a.set_defaults(func=_cmd_attack)


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="fold adapters into the base weights; write a diffusers pipeline folder")
    m.add_argument("adapters", nargs="+", help="adapter folders or files")
    m.add_argument("--base", default="toy", help="`toy`, a diffusers folder or a hub id (default: toy)")
    m.add_argument("--out", required=True, help="pipeline folder to write")
    m.add_argument("--weights", type=number(), nargs="+", help="one weight per adapter (default 1)")
    m.add_argument("--single-file", help="also write the original SD layout (SD 1.x/2.x/XL) to this .safetensors")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="stored dtype (default fp32)")
    m.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle (.ckpt/.bin) base")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out / --single-file")
    m.set_defaults(func=_cmd_merge)


def _add_stack(sub) -> None:
    st = sub.add_parser("stack", help="several erasures in one model: sum, fuse, sequential or joint")
    st.add_argument("inputs", nargs="+", help="adapters (sum, fuse) or recipes (sequential, joint)")
    st.add_argument("--strategy", default="sum", choices=["sum", "fuse", "sequential", "joint"])
    st.add_argument("--base", default="toy")
    st.add_argument("--out", required=True, help="pipeline folder to write")
    st.add_argument("--weights", type=number(), nargs="+", help="sum: one weight per adapter (default 1)")
    st.add_argument("--preserve", help="fuse: a file of prompts whose outputs must not change, one per line")
    st.add_argument("--report", action="store_true",
                    help="measure every erased and kept concept, base against stacked (<out>-report/)")
    st.add_argument("--concepts", nargs="+", help="erased concepts for the report (default: from the adapters)")
    st.add_argument("--clip", help="report: score with this CLIP model (then name --concepts and --kept)")
    st.add_argument("--kept", nargs="+", default=[], help="report with --clip: the concepts that must survive")
    st.add_argument("--n", type=number(int, 1, 100_000), default=64, help="report: images per prompt (default 64)")
    st.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    st.set_defaults(func=_cmd_stack)


def _add_verify_export(sub) -> None:
    v = sub.add_parser("verify", help="recompute a merge and report the largest difference per tensor")
    v.add_argument("merged", help="the merged pipeline folder")
    v.add_argument("--base", default="toy")
    v.add_argument("--adapters", nargs="+", default=[], help="the adapters it should contain")
    v.add_argument("--weights", type=number(), nargs="+")
    v.add_argument("--tolerance", type=number(float, 0), default=1e-5,
                   help="fail above this |difference|, at the merged model's stored dtype (default 1e-5)")
    v.add_argument("--top", type=number(int, 0), default=5, help="show this many largest differences")
    v.add_argument("--json", help="also write every tensor's difference as JSON here")
    v.add_argument("--allow-pickle", action="store_true")
    v.set_defaults(func=_cmd_verify)
    x = sub.add_parser("export", help="write an adapter as a kohya (A1111, ComfyUI) or diffusers LoRA file")
    x.add_argument("adapter", help="adapter folder or file")
    x.add_argument("--format", default="kohya", choices=["kohya", "diffusers"])
    x.add_argument("--out", required=True, help=".safetensors file to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.set_defaults(func=_cmd_export)


def _add_toy(sub) -> None:
    toy = sub.add_parser("toy", help="the toy world: build it, measure it").add_subparsers(dest="toy", required=True)
    b = toy.add_parser("build", help="train the toy classifier, autoencoder and pipeline (about 90 min, 2 cores)")
    b.add_argument("--work", default="build/toy", help="work folder; finished stages are reused")
    b.add_argument("--install", action="store_true", help="copy the result into the package as the `toy` model")
    b.add_argument("--seed", type=number(int, 0), default=0)
    b.add_argument("--unet-steps", type=number(int, 1), default=4000)
    b.add_argument("--unet-extra-steps", type=number(int, 0), default=4000,
                   help="further training from the --unet-steps pipeline, on a fresh lr cycle (0: none)")
    b.set_defaults(func=_cmd_toy_build)
    q = toy.add_parser("quality", help="measure a toy pipeline's concept detection table")
    q.add_argument("--model", default="toy")
    _sampling_flags(q, 32)
    q.add_argument("--out", help="also write the table as JSON here")
    q.set_defaults(func=_cmd_toy_quality)
    f = toy.add_parser("figure", help="renders beside the model's samples for the same captions (the README figure)")
    f.add_argument("--model", default="toy")
    f.add_argument("--out", default="docs/toy_world.png")
    f.set_defaults(func=_cmd_toy_figure)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esd-lora", description="Erase concepts from diffusion models with LoRA.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or ESD_LORA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sample, _add_eval, _add_attack, _add_merge, _add_stack, _add_verify_export, _add_toy):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import traceback

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .errors import EsdLoraError

    p = parser()
    try:
        args, extra = p.parse_known_args(argv)
        if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra  # overrides may follow flags: `train r.yaml --quiet train.steps=10`
        elif extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, or a flag argparse refused (one line already printed)
        return int(done.code or 0)
    debug = args.debug or os.environ.get("ESD_LORA_DEBUG") == "1"
    diffusers_logging.disable_progress_bar()  # loading bars would bury a one-line error; work bars stay
    transformers_logging.disable_progress_bar()
    if not debug:  # libraries' advice on loading would bury a one-line error too
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    try:
        args.func(args)
    except EsdLoraError as err:
        if debug:
            traceback.print_exc()
        print(f"esd-lora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esd-lora: interrupted", file=sys.stderr)
        return 130
    except Exception:  # not a user error: a bug, reported with everything needed to fix it
        traceback.print_exc()
        print("esd-lora: internal error (a bug in esd-lora, not in your input): please report it with the "
              "traceback above", file=sys.stderr)
        return 1
    return 0
