"""Several erasures in one model, four ways.

- `sum`: add every adapter's delta (optionally weighted). Exact and instant; the adapters were each
  trained alone, so where two of them touch the same concept words they can interfere.
- `fuse`: closed-form least squares on the cross-attention key/value projections (in the spirit of
  MACE, CVPR 2024). The fused weight reproduces each adapter's outputs on its own concept's text
  embeddings and the base's outputs on the preserved prompts; the deltas of any other layer are summed.
  Best when many text-keyed erasures must not disturb each other.
- `sequential`: train each next erasure on the model with the earlier ones already merged in.
  Each erasure sees the others' effect, at the cost of one training run per concept, in order.
- `joint`: one adapter trained on every concept at once (one recipe with all their prompts).
  One run; the concepts share the adapter's rank.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .adapter import fuse_text_encoder_adapters, load_adapters, preserve_prompts
from .io import check_output
from .merge import Folded, apply_adapters, check_adapters, model_card, provenance, save_merged
from .models import Conditioner, load_pipeline, resolve
from .provenance import BaseIdentity, base_identity
from .recipe import Recipe, RecipeError

STRATEGIES = ("sum", "fuse", "sequential", "joint")
TEXT_KEYED = (".attn2.to_k", ".attn2.to_v")


def _names_erased(prompt: str, erased: list[str]) -> bool:
    words = set(prompt.lower().split())
    return any(set(e.lower().split()) <= words for e in erased)


def fuse_adapters(pipe, adapters: list[str | Path], preserve: list[str] = (), preserve_weight: float = 1.0,
                  ridge: float = 1e-4, base: BaseIdentity | None = None) -> list[Folded]:
    """Write into the UNet, for every attn2 to_k/to_v layer, W = W0 + (sum_i dW_i C_i)(sum_i C_i + lambda C_p
    + mu I)^-1, with C = E^T E over the token embeddings E of adapter i's prompts (C_p: preserved prompts, the
    empty prompt included). That W minimises sum_i |E_i (W - W0 - dW_i)^T|^2 + lambda |E_p (W - W0)^T|^2 +
    mu |W - W0|^2. Other layers, and the text encoder's, get the plain sum of the deltas."""
    base = base or base_identity(pipe)
    folded = check_adapters(adapters, base)
    erased = [p for f in folded for p in f.record.concepts]
    preserve = list(dict.fromkeys([*preserve, *(p for f in folded for p in preserve_prompts(f.file, f.record)), ""]))
    preserve = [p for p in preserve if not _names_erased(p, erased)]
    cond = Conditioner(pipe, pipe.unet.device, torch.float32)

    def gram(prompts: list[str]) -> torch.Tensor:
        e = torch.cat([cond([p])["encoder_hidden_states"][0] for p in prompts]).double()
        return e.T @ e

    grams = [gram(f.record.concepts) for f in folded]
    preserve_gram = preserve_weight * gram(preserve)
    names = load_adapters(pipe, adapters, base=base)
    new_weights = {}
    for name, module in pipe.unet.named_modules():
        active = [n for n in names if n in getattr(module, "lora_A", {})]
        if not active:
            continue
        w0 = module.get_base_layer().weight.detach().double()
        deltas = [module.get_delta_weight(n).double() for n in active]
        if name.endswith(TEXT_KEYED):
            c = [grams[names.index(n)] for n in active]
            total = sum(c) + preserve_gram
            total = total + ridge * total.diagonal().mean() * torch.eye(len(total), dtype=total.dtype)
            new_weights[name] = w0 + torch.linalg.solve(total, sum(d @ g for d, g in zip(deltas, c)).T).T
        else:
            new_weights[name] = w0 + sum(deltas)
    pipe.unet.unload_lora()
    fuse_text_encoder_adapters(pipe, names)  # the text encoder's LoRA deltas are summed, retrained rows replaced
    with torch.no_grad():
        for name, weight in new_weights.items():
            layer = pipe.unet.get_submodule(name)
            layer.weight.copy_(weight.to(layer.weight.dtype))
    return folded


def joint_recipe(recipes: list[Recipe]) -> Recipe:
    """One recipe erasing every concept of `recipes`: their prompts together, their preserve prompts minus
    anything erased, the first recipe's settings, and as many steps as the recipes together."""
    if any(r.concept.erase_from for r in recipes):
        raise RecipeError("stack joint: erase_from recipes cannot be trained jointly; use sequential")
    if len({r.model.id for r in recipes}) > 1:
        raise RecipeError("stack joint: the recipes name different models")
    joint = copy.deepcopy(recipes[0])
    erased = list(dict.fromkeys(p for r in recipes for p in r.concept.prompts))
    joint.concept.prompts = erased
    joint.concept.preserve = [p for p in dict.fromkeys(p for r in recipes for p in r.concept.preserve)
                              if not _names_erased(p, erased)]
    joint.train.steps = sum(r.train.steps for r in recipes)
    joint.name = "joint-" + "+".join(r.name for r in recipes)
    return joint


def stack(base: str, strategy: str, out: str | Path, adapters: list[str | Path] = (),
          recipes: list[Recipe] = (), weights: list[float] | None = None, preserve: list[str] = (),
          progress: bool = True, overwrite: bool = False) -> tuple[Path, list[Folded]]:
    """Build the stacked model folder `out`; returns it and the adapters it contains.

    sum and fuse take adapters; sequential and joint take recipes and train (their adapters and any
    intermediate models go to `<out>-stages/`). An existing non-empty `out` is replaced only with
    `overwrite`, and never when it holds an input."""
    from .train import train

    if strategy not in STRATEGIES:
        raise RecipeError(f"--strategy: unknown stacking strategy {strategy!r} (choose {', '.join(STRATEGIES)})")
    if strategy in ("sum", "fuse") and not adapters:
        raise RecipeError(f"stack {strategy}: give the adapters to stack")
    if strategy in ("sequential", "joint") and not recipes:
        raise RecipeError(f"stack {strategy}: give the recipes to train")
    if weights and strategy != "sum":
        raise RecipeError(f"--weights: only the sum strategy weighs adapters, not {strategy}")
    out, inputs = Path(out), [*adapters, resolve(base)]
    stages = out.with_name(out.name + "-stages")
    check_output(out, inputs, overwrite, "--out")
    if strategy in ("sequential", "joint"):
        check_output(stages, inputs, overwrite, "--out (its -stages folder)")
    pipe = load_pipeline(base)
    identity = base_identity(pipe)
    if strategy in ("sum", "fuse"):
        weights = list(weights or [1.0] * len(adapters))
        folded = (apply_adapters(pipe, adapters, weights, identity) if strategy == "sum"
                  else fuse_adapters(pipe, adapters, preserve, base=identity))
    else:
        todo = [joint_recipe(list(recipes))] if strategy == "joint" else [copy.deepcopy(r) for r in recipes]
        current, folded = base, []
        for i, recipe in enumerate(todo):
            recipe.model.id, recipe.output.dir = str(current), str(stages / f"{i}-{recipe.name}")
            train(recipe, progress=progress, overwrite=overwrite)
            if i > 0:  # the model this erasure was trained on, as stored, so that its identity matches
                pipe = load_pipeline(str(current))
            folded += apply_adapters(pipe, [recipe.output.dir])
            if i < len(todo) - 1:
                current = stages / f"{i}-model"
                save_merged(pipe, current, provenance(base, identity, folded, [1.0] * len(folded), strategy),
                            model_card(base, folded, [1.0] * len(folded), strategy))
        weights = [1.0] * len(folded)
    save_merged(pipe, out, provenance(base, identity, folded, weights, strategy),
                model_card(base, folded, weights, strategy))
    return out, folded
