"""`esd-lora train`: ESD erasure with a LoRA adapter (or, for comparison, classic full-weight ESD).

One training step, as in the paper:
1. pick a concept prompt c (and, with erase_from, its subject s) and a DDIM index k in [0, T);
2. x_t = k guided DDIM steps from noise, conditioned on c, by the model being trained
   (train.sampler=frozen: by the base); t is drawn in step k's band. With train.refresh_every = N > 1
   one full run of train.batch images is sampled every N steps, and each step takes a latent of each
   image at its own random index k. With concept.preserve_on = own, as many images of the preserve
   prompts are sampled alongside, for the preserve loss;
3. the frozen model (adapter off) predicts on x_t for c and the empty prompt (or s), without gradient;
4. the trained model's prediction is pulled towards esd_target() by MSE.
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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .adapter import ADAPTER_NAME, CLASSIC_WEIGHTS_NAME, WEIGHTS_NAME, lora_config, save_lora, select_modules
from .io import atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text
from .models import Conditioner, load_pipeline
from .objective import adapters_off, esd_loss, esd_target, frozen_predictions, predictions
from .provenance import AdapterProvenance, BaseIdentity, base_identity
from .recipe import Recipe, RecipeError, TrainSection, dump_recipe
from .sampler import loss_timestep, sample_trajectory


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """adamw8bit from bitsandbytes when it runs on the parameters' device, else torch AdamW with a warning."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            probe = torch.zeros(4096, device=params[0].device, requires_grad=True)
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
        except Exception as err:  # any failure of the optional backend means: fall back, never crash
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"warning: bitsandbytes AdamW8bit unavailable on {params[0].device} ({reason}); "
                  f"using torch AdamW", file=sys.stderr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def learning_rate(cfg: TrainSection, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at the last step. Adam moves every weight
    by about lr per step whatever the gradient's size, so at a constant lr an erasure keeps wandering
    across the edge of erased; the decay lets the adapter settle."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def _trainable_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, Any], bool] | None = None, overwrite: bool = False) -> dict:
    """Run the recipe; returns a summary (output folder, time, peak memory, final loss).

    A finished adapter already in the output folder is replaced only with `overwrite`.

    on_step(step, pipe) is called after every step with the pipeline whose UNet is being trained
    (adapter on), e.g. to measure the erasure as it forms; if it returns True, training stops there and
    the adapter and resolved recipe are saved as of that step."""
    from accelerate import Accelerator

    cfg, concept = recipe.train, recipe.concept
    out = recipe.output_dir
    checkpoint = _latest_checkpoint(out)
    if checkpoint and not resume:
        raise RecipeError(f"output.dir: {out} holds checkpoints of an earlier run; pass --resume or pick another dir")
    finished = [out / name for name in (WEIGHTS_NAME, CLASSIC_WEIGHTS_NAME) if (out / name).exists()]
    if finished and not (resume and checkpoint) and not overwrite:
        raise RecipeError(f"output.dir: {out} already holds an adapter; pass --overwrite to replace it or set "
                          "output.dir")
    if recipe.adapter.kind == "none" and recipe.model.dtype != "fp32" and cfg.mixed_precision == "no":
        raise RecipeError("model.dtype: classic mode (adapter: none) trains the weights themselves; "
                          "load them in fp32 or set train.mixed_precision")

    started = time.time()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        print(f"warning: train.mixed_precision fp16 needs a GPU; on the CPU accelerate computes in the weights' "
              f"own dtype (model.dtype {recipe.model.dtype})", file=sys.stderr)
    pipe = load_pipeline(recipe.model.id, recipe.model.dtype, recipe.model.revision, device=device)
    unet = pipe.unet
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if part is not None:
            part.requires_grad_(False)
    base = base_identity(pipe)
    modules = select_modules(unet, recipe.adapter.targets)

    if recipe.adapter.kind == "lora":
        a = recipe.adapter
        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn from the global generator
        unet.add_adapter(lora_config(a.rank, a.alpha, a.dropout, a.init, modules), adapter_name=ADAPTER_NAME)
        teacher = lambda: adapters_off(unet)  # noqa: E731
    else:
        frozen_copy = copy.deepcopy(unet)  # classic ESD: a frozen copy is the teacher
        teacher = lambda: nullcontext(frozen_copy)  # noqa: E731
        for name in modules:
            unet.get_submodule(name).requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr)
    student, optimizer = accelerator.prepare(unet, optimizer)

    start, trajectory, picks = 0, None, None
    if checkpoint is not None:
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / "trainable.safetensors"))
        named = dict(unet.named_parameters())
        missing = set(state) ^ {n for n, p in named.items() if p.requires_grad}
        if missing:
            raise RecipeError(f"--resume: {checkpoint} does not fit this recipe's trainable layers")
        for n, tensor in state.items():
            named[n].data.copy_(tensor.to(named[n].device))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
        saved = json.loads((checkpoint / "state.json").read_text())
        start, picks = saved["step"], saved.get("picks")
        if (checkpoint / "trajectory.safetensors").exists():
            trajectory = load_file(str(checkpoint / "trajectory.safetensors"))["latents"].to(device, unet.dtype)

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    conditioner = Conditioner(pipe, device, unet.dtype)
    own = bool(concept.preserve) and concept.preserve_on == "own"  # preserve prompts get latents of their own
    n_sampled = cfg.batch * (2 if own else 1)
    latent_shape = (n_sampled, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    empty = conditioner([""] * cfg.batch)
    sampling_empty = conditioner([""] * n_sampled)

    def new_picks() -> list[int]:
        """Concept prompt indices, then (own) preserve prompt indices, of the images to sample."""
        picks = [rng.randrange(len(concept.prompts)) for _ in range(cfg.batch)]
        return picks + [rng.randrange(len(concept.preserve)) for _ in range(cfg.batch)] if own else picks

    def sampled_prompts(picks: list[int]) -> list[str]:
        return [concept.prompts[i] for i in picks[:cfg.batch]] + [concept.preserve[j] for j in picks[cfg.batch:]]

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() and start else [])
            if json.loads(line)["step"] <= start]
    log = open(log_path, "w")
    log.writelines(line + "\n" for line in kept)
    t0 = time.time()
    loss_value = float("nan")
    bar = tqdm(range(start, cfg.steps), desc=f"erasing {recipe.name}", initial=start, total=cfg.steps,
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        seed = (cfg.seed * 1_000_003 + step) * 64 + accelerator.process_index
        gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        torch.manual_seed(seed)  # LoRA dropout
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        sampler_ctx = teacher() if cfg.sampler == "frozen" else nullcontext(accelerator.unwrap_model(student))
        if cfg.refresh_every == 1:  # the paper: a fresh partial run to a random DDIM index for every step
            picks = new_picks()
            ks = [int(torch.randint(0, cfg.ddim_steps, (1,), generator=gen))] * cfg.batch
            with sampler_ctx as sampler_unet:
                x = sample_trajectory(sampler_unet, scheduler, conditioner(sampled_prompts(picks)), sampling_empty,
                                      ks[0], cfg.ddim_steps, cfg.guidance, gen, latent_shape, unet.dtype, device)[-1]
        else:  # one full run every refresh_every steps; each step trains on latents at random indices of it
            if trajectory is None or step % cfg.refresh_every == 0:
                picks = new_picks()
                with sampler_ctx as sampler_unet:
                    trajectory = sample_trajectory(sampler_unet, scheduler, conditioner(sampled_prompts(picks)),
                                                   sampling_empty, cfg.ddim_steps - 1, cfg.ddim_steps,
                                                   cfg.guidance, gen, latent_shape, unet.dtype, device)
            ks = [rng.randrange(cfg.ddim_steps) for _ in range(cfg.batch)]
            x = trajectory[ks * (n_sampled // cfg.batch), torch.arange(n_sampled)]
        x_t = x[:cfg.batch]
        t = loss_timestep(ks, cfg.ddim_steps, gen, scheduler.config.num_train_timesteps).to(device)
        trained_cond = conditioner(sampled_prompts(picks)[:cfg.batch])
        neutral = conditioner([concept.subject(i) for i in picks[:cfg.batch]]) if concept.erase_from else empty

        latents, conds = [x_t, x_t], [trained_cond, neutral]
        if concept.preserve:  # on the concept's latents, or (own) on latents sampled from the preserve prompts
            kept = picks[cfg.batch:] if own else [rng.randrange(len(concept.preserve)) for _ in range(cfg.batch)]
            latents.append(x[cfg.batch:] if own else x_t)
            conds.append(conditioner([concept.preserve[j] for j in kept]))
        with teacher() as frozen:
            preds = frozen_predictions(frozen, scheduler, latents, t, conds)
        target = esd_target(preds[0], preds[1], concept.eta)

        with accelerator.autocast():
            rows = [0, 2] if concept.preserve else [0]  # c's and the preserve prompt's predictions, in one call
            eps = predictions(student, scheduler, [latents[i] for i in rows], t, [conds[i] for i in rows])
            loss = esd_loss(eps[0], target)
            if concept.preserve:
                loss = loss + concept.preserve_weight * esd_loss(eps[1], preds[-1])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if accelerator.is_main_process:
            log.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr, "k": ks if cfg.batch > 1 else ks[0],
                                  "time": round(time.time() - t0, 3)}) + "\n")
            log.flush()
            every = recipe.output.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(out, step + 1, accelerator.unwrap_model(student), optimizer, trajectory, picks)
        if on_step is not None and on_step(step + 1, pipe) and step + 1 < cfg.steps:
            recipe = copy.deepcopy(recipe)
            recipe.train.steps = step + 1
            break
    log.close()

    summary = {"output": str(out), "steps": recipe.train.steps, "seconds": round(time.time() - t0, 2),
               "peak_memory_mb": round(_peak_memory_mb(device), 1), "final_loss": loss_value}
    if accelerator.is_main_process:
        _save_result(recipe, accelerator.unwrap_model(student), modules, base, started, out)
        atomic_write_json(out / "summary.json", summary)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def _save_checkpoint(out: Path, step: int, unet, optimizer, trajectory: torch.Tensor | None,
                     picks: list[int] | None) -> None:
    """Trainable weights, optimizer state, the step and the trajectory in use (with its prompts), in one
    folder that appears whole or not at all, so a resumed run continues exactly."""
    with atomic_dir(out / "checkpoints" / f"step_{step:06d}") as tmp:
        atomic_save_safetensors(_trainable_state(unet), tmp / "trainable.safetensors")
        if trajectory is not None:
            atomic_save_safetensors({"latents": trajectory.float().cpu().contiguous()},
                                    tmp / "trajectory.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "picks": picks}))
    for old in sorted((out / "checkpoints").glob("step_*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _save_result(recipe: Recipe, unet, modules: list[str], base: BaseIdentity, started: float, out: Path) -> None:
    """The adapter (or classic weights) with provenance in the safetensors header, and the resolved recipe."""
    c = recipe.concept
    metadata = AdapterProvenance.for_base(
        base, concepts=c.prompts, erase_from=c.erase_from, eta=c.eta, targets=modules,
        target_spec=recipe.adapter.targets, steps=recipe.train.steps, recipe_name=recipe.name,
        base_model=recipe.model.id, base_revision=recipe.model.revision or "", training_started_at=started,
    ).to_metadata()
    if recipe.adapter.kind == "lora":
        save_lora(unet, out / WEIGHTS_NAME, metadata)
        config = unet.peft_config[ADAPTER_NAME].to_dict()
        atomic_write_json(out / "adapter_config.json",
                          {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})
    else:
        weights = {f"{m}.{n}": p.detach().float().cpu().contiguous()
                   for m in modules for n, p in unet.get_submodule(m).named_parameters()}
        atomic_save_safetensors(weights, out / CLASSIC_WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
