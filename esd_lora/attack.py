"""`esd-lora attack`: a robustness audit of an erasure, for whoever ships the weights.

Someone who holds the weights can look for the concept instead of asking for it by name. Three attacks,
each reported as the rate at which the erased concept comes back against the compute spent:
- `prompts`: a search over prompts that say the concept in other words and contexts (the scorer's
  held-out prompts, or a prompt file): every candidate is screened on a few images, the worst ones are
  measured on the full seed set;
- `ti`: textual inversion (Pham et al. 2023): new tokens in place of the concept's word, learned on images
  of the concept (a folder, the model's renders, or the base model's own samples) with the erased model
  frozen;
- `soft-prompt`: continuous prompt embeddings (as in UnlearnDiffAtk and AdvUnlearn) put in front of the
  prompts that name the concept, learned on the base model's samples of them.
The base model's rate under the same prompts and tokens is reported beside the erased one. An attack's
outcome moves with its seed (on the toy's robust red erasure, textual inversion brought red back in 19-41 %
of images over five seeds), so `repeats` runs each attack at several seeds and reports the one that did best,
as an attacker would keep it, beside every seed's rate.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adversary import LearnedTokens, TokenFit, captions, check_single_encoder, image_latents, random_embeddings, word_embeddings
from .errors import EsdLoraError
from .objective import adapters_off
from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate

METHODS = ("prompts", "ti", "soft-prompt")
GRID_IMAGES = 2  # images per attack prompt in the grid


@dataclass
class AttackSettings:
    """One audit's settings. steps/lr/tokens/batch/init apply to the learned attacks (ti, soft-prompt);
    candidates/screen/keep to the prompt search; n/seed/sampling to every measurement."""

    concept: str
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 400
    lr: float = 5e-3
    tokens: int = 1
    init: str | None = None  # ti: the word the tokens start from (default: the concept); soft-prompt: random words
    batch: int = 16
    measure_at: list[int] = field(default_factory=list)  # default: 0, steps/8, steps/4, steps/2, steps
    images: str | None = None  # a folder of images of the concept (default: renders, else base samples)
    target_images: int = 64
    candidates: int = 128
    screen: int = 4
    keep: int = 8
    n: int = 32
    seed: int = 0
    repeats: int = 1  # each attack at seeds seed .. seed + repeats - 1
    sampling_steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE

    def checkpoints(self) -> list[int]:
        """The steps at which the rate is measured (0: before any step); the last is always measured."""
        return sorted({*(self.measure_at or [0, *(max(1, self.steps // d) for d in (8, 4, 2))]), self.steps})


@contextmanager
def base_model(pipe, base_pipe):
    """The base model: a separately loaded one (an attack on a merged model), or the same pipeline with its
    erasure adapters off, the text encoder's (LoRA layers or retrained token rows) too."""
    if base_pipe is not None:
        yield base_pipe
        return
    with adapters_off(pipe.unet, pipe.text_encoder):
        yield pipe


class Audit:
    """The erased model, the base, the scorer and the measurement settings shared by every attack."""

    def __init__(self, pipe, base_pipe, scorer, settings: AttackSettings, progress: bool = True) -> None:
        self.pipe, self.base_pipe, self.scorer, self.s, self.progress = pipe, base_pipe, scorer, settings, progress
        self.templates = scorer.attack_templates(settings.concept)
        if not self.templates:
            raise EsdLoraError(f"--concept {settings.concept}: the scorer has no prompts to attack it with")

    def rates(self, pipe, prompts: list[str], said: list[str], seeds: range) -> tuple[list[float], torch.Tensor]:
        """The concept's detection rate in each prompt's images; `said` is each prompt with the concept named,
        which tells the scorer what to look for."""
        n = len(seeds)
        images = generate(pipe, [p for p in prompts for _ in seeds], list(seeds) * len(prompts),
                          self.s.sampling_steps, self.s.guidance, progress=False)
        concept = self.s.concept
        return [self.scorer(images[i * n:(i + 1) * n], s)[concept] for i, s in enumerate(said)], images

    @property
    def seeds(self) -> range:
        return range(self.s.seed, self.s.seed + self.s.n)

    def said(self) -> list[str]:
        return [t.format(self.s.concept) for t in self.templates]

    def targets(self, method: str, renders) -> tuple[torch.Tensor, list[str]]:
        """Images of the concept the learned tokens are fitted to, and what each shows (`adversary.captions`):
        the folder's images (captioned with the templates in turn), the model's own renders (ti, where the
        model has them, captioned by the plug-in), or the base model's samples of the concept's prompts."""
        s, count, said = self.s, self.s.target_images, self.said()
        source = self.templates if method == "ti" else said  # said[i] is templates[i] with the concept

        def texts(k: int) -> list[str]:
            return [source[i % len(source)] for i in range(k)]

        if s.images:
            images = read_images(s.images, self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
            return images, texts(len(images))
        if method == "ti" and renders is not None:
            return renders(s.concept, count, s.seed)
        with base_model(self.pipe, self.base_pipe) as base:
            images = generate(base, [said[i % len(said)] for i in range(count)],
                              [10_000 + s.seed + i for i in range(count)], s.sampling_steps, s.guidance, progress=False)
        return images, texts(count)

    def learned(self, method: str, renders) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
        """Fit tokens for `ti` or `soft-prompt`; the rate at each checkpoint, the grid rows and the vectors."""
        s = self.s
        images, texts = self.targets(method, renders)
        x0 = image_latents(self.pipe, images)
        if method == "ti":  # the word as the base reads it: an erasure that retrained its row does not hide it
            with base_model(self.pipe, self.base_pipe) as base:
                init = word_embeddings(base, [s.init or s.concept] * s.tokens)
        else:
            init = random_embeddings(self.pipe, s.tokens, s.seed)
        tokens = LearnedTokens(self.pipe, init, group=method)
        prompts = captions(method, tokens.text, self.templates if method == "ti" else self.said())
        fit = TokenFit(captions(method, tokens.text, texts), s.lr, s.batch)
        generator = torch.Generator().manual_seed(s.seed)
        curve, spent, done = [], 0.0, 0
        bar = tqdm(total=s.steps, desc=f"attack {method}", disable=not self.progress)
        for checkpoint in s.checkpoints():
            started = time.time()
            fit.run(tokens, self.pipe.unet, self.pipe.scheduler, x0, checkpoint - done, generator,
                    on_step=lambda _: bar.update())
            spent, done = spent + time.time() - started, checkpoint
            rates, images = self.rates(self.pipe, prompts, self.said(), self.seeds)
            curve.append({"step": checkpoint, "seconds": round(spent, 2), "rate": _mean(rates)})
            bar.set_postfix(rate=f"{_mean(rates):.0%}")
        bar.close()
        with base_model(self.pipe, self.base_pipe) as base:
            base_tokens = LearnedTokens(base, tokens.vectors, group=method) if base is not self.pipe else None
            base_rates, base_images = self.rates(base, prompts, self.said(), self.seeds)
            if base_tokens:
                base_tokens.remove()
        tokens.remove()
        result = {"prompts": prompts, "curve": curve, "rate": curve[-1]["rate"], "base_rate": _mean(base_rates),
                  "per_prompt": {p: {"erased": r, "base": b} for p, r, b in zip(prompts, rates, base_rates)},
                  "seconds": curve[-1]["seconds"], "steps": s.steps}
        return result, _grid_rows(images, base_images, len(prompts), s.n), tokens.state()

    def prompt_search(self, candidates: list[str] | None) -> tuple[dict, torch.Tensor]:
        """Screen every candidate prompt on `screen` images, then measure the `keep` worst on the full seeds."""
        s, scorer = self.s, self.scorer
        if candidates is None:
            candidates = scorer.held_out_prompts([s.concept], [], s.candidates, s.seed)
        candidates = [p for p in candidates if s.concept in scorer.concepts(p)]
        if not candidates:
            raise EsdLoraError(f"attack prompts: no candidate prompt names {s.concept!r}; give --prompts FILE")
        started = time.time()
        screen_seeds = range(s.seed + s.n, s.seed + s.n + s.screen)
        screened = []
        for start in tqdm(range(0, len(candidates), 16), desc="attack prompts", disable=not self.progress):
            chunk = candidates[start:start + 16]
            screened += self.rates(self.pipe, chunk, chunk, screen_seeds)[0]
        worst = [p for _, p in sorted(zip(screened, candidates), key=lambda r: -r[0])][:s.keep]
        spent = time.time() - started
        rates, images = self.rates(self.pipe, worst, worst, self.seeds)
        with base_model(self.pipe, self.base_pipe) as base:
            base_rates, base_images = self.rates(base, worst, worst, self.seeds)
        order = sorted(range(len(worst)), key=lambda i: -rates[i])
        result = {"tried": len(candidates), "screen_images": s.screen, "seconds": round(spent, 2),
                  "rate": rates[order[0]], "mean_of_worst": _mean(rates), "base_rate": _mean(base_rates),
                  "worst": [{"prompt": worst[i], "erased": rates[i], "base": base_rates[i]} for i in order]}
        return result, _grid_rows(images, base_images, len(worst), s.n)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _grid_rows(erased: torch.Tensor, base: torch.Tensor, prompts: int, n: int) -> torch.Tensor:
    """Two rows: the first images of every prompt under the attack, on the erased model then on the base."""
    shown = min(n, GRID_IMAGES)
    pick = [i * n + j for i in range(prompts) for j in range(shown)]
    return torch.stack([erased[pick], base[pick]])


def read_images(folder: str, size: int) -> torch.Tensor:
    """The images of a folder (png, jpg, webp), as RGB squares of the model's size in [-1, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise EsdLoraError(f"--images {folder}: no .png/.jpg/.webp images there")
    out = []
    for path in files:
        try:
            image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        except (OSError, UnidentifiedImageError):
            raise EsdLoraError(f"--images: {path} is not a readable image") from None
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def attack(model: str, adapters: list[str], scorer, settings: AttackSettings, erased_model: str | None = None,
           candidates: list[str] | None = None, progress: bool = True) -> tuple[dict, object, dict]:
    """Run the audit's attacks on `model` + adapters (or on `erased_model`, against `model` as the base).
    Returns the report, the grid image and the learned tokens of each learned attack."""
    from .adapter import load_adapters
    from .models import load_pipeline, named_models
    from .sample import to_pil_grid

    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise EsdLoraError(f"--method {unknown[0]}: unknown (known: {', '.join(METHODS)})")
    if settings.concept not in scorer.concepts(settings.concept):
        raise EsdLoraError(f"--concept {settings.concept!r}: the scorer cannot detect it")
    pipe = load_pipeline(erased_model or model)
    if {"ti", "soft-prompt"} & set(settings.methods):
        check_single_encoder(pipe, f"--method {' '.join(settings.methods)}")
    load_adapters(pipe, adapters)
    base_pipe = load_pipeline(model) if erased_model else None
    renders = getattr(named_models().get(model), "images", None)
    results, rows, tokens = {}, [], {}
    for method in settings.methods:
        runs = []
        for seed in range(settings.seed, settings.seed + settings.repeats):
            torch.manual_seed(seed)
            audit = Audit(pipe, base_pipe, scorer, replace(settings, seed=seed), progress)
            runs.append((*audit.prompt_search(candidates), None) if method == "prompts" else
                        audit.learned(method, renders))
        best = max(range(len(runs)), key=lambda i: runs[i][0]["rate"])  # the first of equals
        results[method], grid, learned = runs[best]
        results[method]["seed"] = settings.seed + best
        results[method]["by_seed"] = [{"seed": settings.seed + i, "rate": r["rate"], "base_rate": r["base_rate"],
                                       "seconds": r["seconds"]} for i, (r, _, _) in enumerate(runs)]
        results[method]["mean_rate"] = _mean([r["rate"] for r, _, _ in runs])
        if learned is not None:
            tokens[method] = learned
        rows.append(grid)
    s = settings
    report = {"model": model, "erased_model": erased_model or model, "adapters": [str(a) for a in adapters],
              "concept": s.concept,
              "settings": {**asdict(s), "measure_at": s.checkpoints(), "scheduler": type(pipe.scheduler).__name__,
                           "scorer": scorer.name},
              "attacks": results}
    width = max(r.shape[1] for r in rows)
    padded = [torch.cat([r, -torch.ones(2, width - r.shape[1], *r.shape[2:])], 1) for r in rows]
    grid = to_pil_grid(torch.cat([p.reshape(-1, *p.shape[2:]) for p in padded]), cols=width, scale=3)
    return report, grid, tokens


def format_report(report: dict) -> str:
    """The audit as Markdown: one row per attack, then each attack's details."""
    s = report["settings"]
    lines = ["# Attack report", "",
             f"Erased model `{report['erased_model']}`" + (f" (base `{report['model']}` + "
             + ", ".join(f"`{a}`" for a in report["adapters"]) + ")" if report["adapters"] else "")
             + f", base `{report['model']}`. Concept: **{report['concept']}**.",
             f"{s['n']} images per prompt, seeds {s['seed']}..{s['seed'] + s['n'] - 1}"
             + (f" (an attack at seed k: k..k+{s['n'] - 1})" if s["repeats"] > 1 else "")
             + f", {s['sampling_steps']} steps of {s['scheduler']}, guidance {s['guidance']}, scored by {s['scorer']}.",
             "", "| attack | compute | concept back, erased model | same attack on the base |", "|---|---|---|---|"]
    repeats = s["repeats"]
    for method, r in report["attacks"].items():
        compute = (f"{r['tried']} prompts x {r['screen_images']} images, {r['seconds']:.0f} s" if method == "prompts"
                   else f"{r['steps']} steps, {r['seconds']:.0f} s")
        spread = ""
        if repeats > 1:
            compute += f" (all {repeats} seeds: {sum(b['seconds'] for b in r['by_seed']):.0f} s)"
            spread = f" (seed {r['seed']}, the highest of {repeats} seeds; mean {r['mean_rate']:.0%})"
        lines.append(f"| {method} | {compute} | {r['rate']:.0%}{spread} | {r['base_rate']:.0%} |")
    for method, r in report["attacks"].items():
        lines += ["", f"## {method}", ""]
        if repeats > 1:
            lines += [f"At seed {r['seed']}, where it did best; by seed, concept back on the erased model (on the "
                      "base): " + ", ".join(f"{b['seed']}: {b['rate']:.0%} ({b['base_rate']:.0%})"
                                            for b in r["by_seed"]) + ".", ""]
        if method == "prompts":
            lines += ["| prompt | erased | base |", "|---|---|---|"]
            lines += [f"| {w['prompt']} | {w['erased']:.0%} | {w['base']:.0%} |" for w in r["worst"]]
        else:
            lines += [f"Learned tokens: {s['tokens']}, lr {s['lr']}, batch {s['batch']}"
                      + (f", from the word {s['init'] or report['concept']!r}" if method == "ti" else
                         ", from random words") + ".", "",
                      "| step | seconds | concept back |", "|---|---|---|"]
            lines += [f"| {c['step']} | {c['seconds']:.0f} | {c['rate']:.0%} |" for c in r["curve"]]
    lines += ["", "grid.png: per attack, its first images on the erased model (upper row) and on the base (lower)."]
    return "\n".join(lines) + "\n"
