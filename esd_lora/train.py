"""`esd-lora train`: ESD erasure with a LoRA adapter (or, for comparison, classic full-weight ESD).

The loop in `train()` is built from named parts:
- model setup (`setup_model`): the adapter (or the classic weights) to train, and the frozen teacher,
  which is the same UNet with the adapter switched off;
- where latents come from (`latents.PartialRuns`, the paper's, or `latents.RefreshedTrajectories`, the
  fast default): guided DDIM runs of the concept by the model being trained (train.sampler=frozen: by
  the base), with their own state for checkpoints;
- one ESD step (`objective.EsdStep`): teacher predictions for the concept and the neutral prompt, the
  negatively guided target, the trained model's loss, and the preserve loss.
The loss timestep t of each latent is drawn in the band of its DDIM index k, so training covers every
noise level. Every step's randomness derives from train.seed and the step number, so `--resume` from a
checkpoint reaches the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import shutil
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .adapter import (ADAPTER_NAME, CLASSIC_WEIGHTS_NAME, TEXT_PREFIX, TOKEN_ROWS, WEIGHTS_NAME, add_text_adapter,
                      concept_token_ids, lora_config, save_lora, select_modules, select_text_modules,
                      token_config)
from .adversary import Adversary
from .io import atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text
from .latents import GuidedRuns, PartialRuns, RefreshedTrajectories
from .models import Conditioner, load_pipeline
from .objective import EsdStep, adapters_off
from .provenance import AdapterProvenance, BaseIdentity, base_identity
from .errors import TrainingError, reason
from .recipe import Recipe, RecipeError, TrainSection, dump_recipe
from .sampler import loss_timestep


RUN_FILES = (WEIGHTS_NAME, CLASSIC_WEIGHTS_NAME, "adapter_config.json", "recipe.yaml", "log.jsonl", "summary.json")


def make_optimizer(name: str, params: list[torch.nn.Parameter] | list[dict], lr: float) -> torch.optim.Optimizer:
    """adamw8bit from bitsandbytes when it runs on the parameters' device, else torch AdamW with a warning.
    `params`: parameters, or torch's parameter groups."""
    device = (params[0]["params"][0] if isinstance(params[0], dict) else params[0]).device
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            probe = torch.zeros(4096, device=device, requires_grad=True)
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
        except Exception as err:  # any failure of the optional backend means: fall back, never crash
            print(f"warning: bitsandbytes AdamW8bit unavailable on {device} ({reason(err)}); "
                  f"using torch AdamW", file=sys.stderr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def lr_factor(cfg: TrainSection, step: int) -> float:
    """The share of each group's lr at this step: linear warm-up, then constant or cosine decay to zero at the
    last step. Adam moves every weight by about lr per step whatever the gradient's size, so at a constant lr
    an erasure keeps wandering across the edge of erased; the decay lets the adapter settle."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def step_random(seed: int, step: int, process: int) -> tuple[torch.Generator, random.Random]:
    """The step's own generators (torch for noise and timesteps, Python for picks); also seeds torch's global
    generator, which LoRA dropout draws from."""
    seed = (seed * 1_000_003 + step) * 64 + process
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed), random.Random(seed)


@dataclass
class TrainedModel:
    """The UNet being trained (and its text encoder, when adapted too), their trainable layers (the text
    encoder's prefixed `text_encoder.`) and parameters, the optimizer's parameter groups and the peak lr of
    each (kept out of the groups, which a checkpoint's optimizer state replaces), and the frozen teacher."""

    unet: torch.nn.Module
    modules: list[str]
    groups: list[dict]
    lrs: list[float]
    teacher: Callable[[], AbstractContextManager]  # yields the frozen model
    text_encoder: torch.nn.Module | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.groups for p in group["params"]]


def setup_model(recipe: Recipe, unet: torch.nn.Module, pipe=None) -> TrainedModel:
    """Add the LoRA adapter to the frozen UNet (teacher: the same UNet with it off) or, in classic mode,
    unfreeze the selected weights (teacher: a frozen copy). With `adapter.text_encoder` (or
    `adapter.concept_tokens`), the pipeline's text encoder gets LoRA layers (or retrained rows of the concept's
    words) too, off in the teacher. Trainable weights are kept in fp32."""
    unet.requires_grad_(False)
    modules = select_modules(unet, recipe.adapter.targets)
    a = recipe.adapter
    text_modules = select_text_modules(pipe, a.text_encoder, a.concept_tokens) if pipe is not None else []
    text_encoder = pipe.text_encoder if text_modules else None
    if a.kind == "lora":
        torch.manual_seed(recipe.train.seed)  # LoRA A matrices are drawn from the global generator
        unet.add_adapter(lora_config(a.rank, a.alpha, a.dropout, a.init, modules), adapter_name=ADAPTER_NAME)
        if text_encoder is not None:
            add_text_adapter(text_encoder, token_config(text_modules[0], concept_token_ids(pipe.tokenizer, recipe.concept))
                             if a.concept_tokens else lora_config(a.rank, a.alpha, a.dropout, a.init, text_modules))
        teacher = lambda: adapters_off(unet, text_encoder)  # noqa: E731
    else:
        frozen_copy = copy.deepcopy(unet)
        teacher = lambda: nullcontext(frozen_copy)  # noqa: E731
        for name in modules:
            unet.get_submodule(name).requires_grad_(True)
    named = [(n, p) for model in (unet, text_encoder) if model is not None for n, p in model.named_parameters()
             if p.requires_grad]
    if recipe.train.lr == 0:  # the words' rows alone: the UNet's LoRA stays zero, frozen
        for n, p in named:
            p.requires_grad_(TOKEN_ROWS in n)
        named = [(n, p) for n, p in named if TOKEN_ROWS in n]
    for _, p in named:
        p.data = p.data.float()
    rows = [p for n, p in named if TOKEN_ROWS in n]  # retrained token rows train at their own lr
    layers = [p for n, p in named if TOKEN_ROWS not in n]
    groups, lrs = ([{"params": layers}], [recipe.train.lr]) if layers else ([], [])
    if rows:
        groups.append({"params": rows})
        lrs.append(recipe.train.token_lr or recipe.train.lr)
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return TrainedModel(unet, modules + [TEXT_PREFIX + m for m in text_modules], groups, lrs, teacher, text_encoder)


def latent_source(recipe: Recipe, unet: torch.nn.Module, conditioner: Callable[[list[str]], dict],
                  scheduler) -> PartialRuns | RefreshedTrajectories:
    """The paper's partial runs (train.refresh_every 1) or refreshed trajectories of the concept."""
    cfg, concept = recipe.train, recipe.concept.trained()
    own = concept.preserve if concept.preserve_on in ("own", "both") else []
    runs = GuidedRuns(conditioner, scheduler, concept.prompts, own, cfg.batch, cfg.ddim_steps, cfg.guidance,
                      (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), unet.dtype,
                      unet.device)
    return PartialRuns(runs) if cfg.refresh_every == 1 else RefreshedTrajectories(runs, cfg.refresh_every)


def adversaries_for(recipe: Recipe, pipe, model: TrainedModel, conditioner: Callable[[list[str]], dict],
                    scheduler) -> list[Adversary]:
    """The robust erasure's attackers (recipe section `attack`), fitted to the base model's samples of the
    concept prompts, drawn once (seeded) at the start."""
    cfg, a, concept, unet = recipe.train, recipe.attack, recipe.concept.trained(), model.unet
    if not a.methods:
        return []
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    gen, rng, x0, picks = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed), [], []
    with model.teacher() as frozen:
        for start in range(0, a.images, cfg.batch):
            runs = GuidedRuns(conditioner, scheduler, concept.prompts, [], min(cfg.batch, a.images - start),
                              cfg.ddim_steps, cfg.guidance, shape, unet.dtype, unet.device)
            picks.append(runs.pick(rng))
            x0.append(runs.run(frozen, picks[-1], cfg.ddim_steps, gen)[-1].float())
    picks = [i for chunk in picks for i in chunk]
    contexts = recipe.concept.contexts

    def shows(method: str, i: int, j: int) -> str:
        """What the j-th sample, of trained prompt i, shows: its context with {} for the concept (ti), or its
        prompt (soft-prompt)."""
        if method == "soft-prompt":
            return concept.prompts[i]
        return a.templates[j % len(a.templates)] if a.templates else contexts[i % len(contexts)] if contexts else "{}"

    return [Adversary(pipe, method, a, recipe.concept.prompts[0], torch.cat(x0),
                      [shows(method, i, j) for j, i in enumerate(picks)], cfg.seed,
                      [shows(method, i, i) for i in range(len(concept.prompts))])
            for method in a.methods]


def _output_folder(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The output folder and its checkpoint to resume from, after refusing what would lose a user's work."""
    out = recipe.output_dir
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise RecipeError(f"output.dir: {out} is a file, or lies under one")
    model = Path(recipe.model.id).resolve()
    if out.resolve() == model or out.resolve() in model.parents:
        raise RecipeError(f"output.dir: {out} holds the base model {recipe.model.id}; write the adapter elsewhere")
    found = _checkpoints(out)
    checkpoint = found[-1] if found else None
    if checkpoint and not resume:
        raise RecipeError(f"output.dir: {out} holds checkpoints of an earlier run; pass --resume or pick another dir")
    written = [name for name in RUN_FILES if (out / name).exists()]
    if written and not (resume and checkpoint) and not overwrite:
        what = "an adapter" if {WEIGHTS_NAME, CLASSIC_WEIGHTS_NAME} & set(written) else f"a run's {written[0]}"
        raise RecipeError(f"output.dir: {out} already holds {what}; pass --overwrite to replace it or set output.dir")
    if recipe.adapter.kind == "none" and recipe.model.dtype != "fp32" and recipe.train.mixed_precision == "no":
        raise RecipeError("model.dtype: classic mode (adapter: none) trains the weights themselves; "
                          "load them in fp32 or set train.mixed_precision")
    return out, checkpoint


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, Any], bool] | None = None, overwrite: bool = False) -> dict:
    """Run the recipe; returns a summary (output folder, time, peak memory, final loss).

    A finished adapter already in the output folder is replaced only with `overwrite`. on_step(step, pipe)
    is called after every step with the pipeline whose UNet is being trained (adapter on), e.g. to measure
    the erasure as it forms; if it returns True, training stops there and the adapter is saved as of then."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler

    cfg, (out, checkpoint), started = recipe.train, _output_folder(recipe, resume, overwrite), time.time()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        print(f"warning: train.mixed_precision fp16 needs a GPU; on the CPU accelerate computes in the weights' "
              f"own dtype (model.dtype {recipe.model.dtype})", file=sys.stderr)
    pipe = load_pipeline(recipe.model.id, recipe.model.dtype, recipe.model.revision, device=accelerator.device)
    for part in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if part is not None:
            part.requires_grad_(False)
    base, model = base_identity(pipe), setup_model(recipe, pipe.unet, pipe)
    student, optimizer = accelerator.prepare(model.unet, make_optimizer(cfg.optimizer, model.groups, model.lrs[0]))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    conditioner = Conditioner(pipe, accelerator.device, model.unet.dtype, cache=model.text_encoder is None)
    source = latent_source(recipe, model.unet, conditioner, scheduler)
    esd = EsdStep(recipe.concept.trained(), conditioner, scheduler, cfg.batch)
    adversaries = adversaries_for(recipe, pipe, model, conditioner, scheduler)
    start = _load_checkpoint(checkpoint, model, optimizer, source, adversaries) if checkpoint else 0
    sampling = model.teacher if cfg.sampler == "frozen" else lambda: nullcontext(accelerator.unwrap_model(student))
    log, t0, loss = RunLog(out / "log.jsonl", start, accelerator.is_main_process), time.time(), None
    bar = tqdm(range(start, cfg.steps), desc=f"erasing {recipe.name}", initial=start, total=cfg.steps,
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        gen, rng = step_random(cfg.seed, step, accelerator.process_index)
        factor = lr_factor(cfg, step)
        for group, peak in zip(optimizer.param_groups, model.lrs):
            group["lr"] = peak * factor
        latents = source.draw(step, gen, rng, sampling)
        if adversaries and step % recipe.attack.every == 0:
            with accelerator.autocast():
                for adversary in adversaries:
                    adversary.refresh(accelerator.unwrap_model(student), scheduler, gen, step // recipe.attack.every)
        said = [(a, a.prompts_for(latents.picks[:cfg.batch], rng), None) for a in adversaries]
        said += [(a, p, past) for a, p, _ in said if (past := a.past(rng)) is not None]  # attack.pool
        adversarial = [a.condition(p, model.text_encoder is not None, v) for a, p, v in said]
        frozen = []
        if recipe.attack.target == "attacker":  # the teacher's conditioning: its text encoder has no adapter
            with model.teacher():
                frozen = [a.condition(p, vectors=v) for a, p, v in said]
        t = loss_timestep(latents.ks, cfg.ddim_steps, gen, scheduler.config.num_train_timesteps).to(accelerator.device)
        loss = esd.loss(student, model.teacher, latents, t, rng, accelerator.autocast, adversarial, recipe.attack.weight,
                        frozen, recipe.attack.eta)
        accelerator.backward(loss)
        if cfg.mixed_precision != "fp16":  # fp16's loss scaler skips an overflowing step by itself
            _stop_unless_finite("loss or a gradient", [loss, *(p.grad for p in model.params)], step + 1, out)
        optimizer.step()
        _stop_unless_finite("trained weights", model.params, step + 1, out)
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(step + 1, loss.item(), model.lrs[0] * factor, latents.ks, time.time() - t0)
        every = recipe.output.checkpoint_every
        if accelerator.is_main_process and every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(out, step + 1, accelerator.unwrap_model(student), model.text_encoder, optimizer, source,
                             adversaries)
        if on_step is not None and on_step(step + 1, pipe) and step + 1 < cfg.steps:
            recipe = copy.deepcopy(recipe)
            recipe.train.steps = step + 1
            break
    log.close()
    summary = {"output": str(out), "steps": recipe.train.steps, "seconds": round(time.time() - t0, 2),
               "peak_memory_mb": round(_peak_memory_mb(accelerator.device), 1),
               "final_loss": loss.item() if loss is not None else float("nan")}
    if accelerator.is_main_process:
        _save_result(recipe, accelerator.unwrap_model(student), model.text_encoder, model.modules, base, started, out)
        atomic_write_json(out / "summary.json", summary)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*"))


def _stop_unless_finite(what: str, tensors: list[torch.Tensor | None], step: int, out: Path) -> None:
    """Stop training with one line at the first NaN or infinity, before it is logged or saved; the last
    checkpoint stays for --resume."""
    if all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
        return
    found = _checkpoints(out)
    kept = f"the checkpoint of step {int(found[-1].name[5:])} is kept" if found else "no checkpoint was written yet"
    raise TrainingError(f"train: the {what} became NaN or infinite at step {step} (lower train.lr or concept.eta); "
                        f"{kept}")


class RunLog:
    """log.jsonl, one line per step, appended as the run goes. A resumed run keeps the lines up to its
    checkpoint's step; only the main process writes."""

    def __init__(self, path: Path, start: int, main: bool) -> None:
        self.file = None
        if not main:
            return
        if path.exists() and start:  # drop the lines of steps after the checkpoint, crash-safely
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= start]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def write(self, step: int, loss: float, lr: float, ks: list[int], seconds: float) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "k": ks if len(ks) > 1 else ks[0],
                                        "time": round(seconds, 3)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _logged_step(line: str) -> float:
    """The step of a log line; infinite for a line a kill cut short, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _trainable(unet, text_encoder) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name, the text encoder's prefixed `text_encoder.`."""
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if text_encoder is not None:
        named.update({TEXT_PREFIX + n: p for n, p in text_encoder.named_parameters() if p.requires_grad})
    return named


def _save_checkpoint(out: Path, step: int, unet, text_encoder, optimizer, source, adversaries: list[Adversary]) -> None:
    """Trainable weights, optimizer state, the step, the latent source's state and the attacker's tokens, in
    one folder that appears whole or not at all, so a resumed run continues exactly."""
    state = source.state()
    with atomic_dir(out / "checkpoints" / f"step_{step:06d}") as tmp:
        trainable = {n: p.detach().float().cpu().contiguous() for n, p in _trainable(unet, text_encoder).items()}
        atomic_save_safetensors(trainable, tmp / "trainable.safetensors")
        if "trajectory" in state:
            atomic_save_safetensors({"latents": state["trajectory"].float().cpu().contiguous()},
                                    tmp / "trajectory.safetensors")
        if adversaries:
            atomic_save_safetensors({k: v for a in adversaries for k, v in a.state().items()},
                                    tmp / "adversaries.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "picks": state.get("picks")}))
    for old in _checkpoints(out)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(checkpoint: Path, model: TrainedModel, optimizer, source, adversaries: list[Adversary]) -> int:
    """Restore what `_save_checkpoint` wrote; returns the step to continue from."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "trainable.safetensors"))
    named = _trainable(model.unet, model.text_encoder)
    if set(state) ^ set(named):
        raise RecipeError(f"--resume: {checkpoint} does not fit this recipe's trainable layers")
    for n, tensor in state.items():
        named[n].data.copy_(tensor.to(named[n].device))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=model.params[0].device,
                                         weights_only=True))
    saved = json.loads((checkpoint / "state.json").read_text())
    if (checkpoint / "trajectory.safetensors").exists():
        source.load_state({"trajectory": load_file(str(checkpoint / "trajectory.safetensors"))["latents"],
                           "picks": saved["picks"]})
    if adversaries:
        saved_tokens = load_file(str(checkpoint / "adversaries.safetensors")) if (
            checkpoint / "adversaries.safetensors").exists() else {}
        if {k for k in saved_tokens if not k.endswith(".pool")} != {a.tokens.names[0] for a in adversaries}:
            raise RecipeError(f"--resume: {checkpoint} was written without this recipe's attack section")
        for adversary in adversaries:
            adversary.load_state(saved_tokens)
    return saved["step"]


def _save_result(recipe: Recipe, unet, text_encoder, modules: list[str], base: BaseIdentity, started: float,
                 out: Path) -> None:
    """The adapter (or classic weights) with provenance in the safetensors header, and the resolved recipe."""
    c = recipe.concept.trained()  # the prompts as trained, in their contexts
    metadata = AdapterProvenance.for_base(
        base, concepts=c.prompts, preserve=c.preserve, erase_from=c.erase_from, eta=c.eta, targets=modules,
        target_spec=recipe.adapter.targets, steps=recipe.train.steps, recipe_name=recipe.name,
        base_model=recipe.model.id, base_revision=recipe.model.revision or "", training_started_at=started,
    ).to_metadata()
    if recipe.adapter.kind == "lora":
        save_lora(unet, out / WEIGHTS_NAME, metadata, text_encoder)
        config = unet.peft_config[ADAPTER_NAME].to_dict()
        atomic_write_json(out / "adapter_config.json",
                          {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})
    else:
        weights = {f"{m}.{n}": p.detach().float().cpu().contiguous()
                   for m in modules for n, p in unet.get_submodule(m).named_parameters()}
        atomic_save_safetensors(weights, out / CLASSIC_WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
