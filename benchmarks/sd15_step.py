"""Memory and time of one ESD training step on the full-size SD 1.5 UNet, esd-lora against classic ESD.

    python benchmarks/sd15_step.py            # all four configurations, each in its own process

The UNet has SD 1.5's public architecture with random weights (no download), on CPU, at 32x32 latents,
batch 1, targets `esd-x` (cross-attention). esd-lora: LoRA rank 4 on those layers, the same UNet with
adapters off as teacher, AdamW8bit. Classic ESD: the layers' full weights trained, a frozen copy of the
UNet as teacher, Adam. `bf16` keeps the frozen weights in bf16 and runs under accelerate's bf16 autocast;
trainable weights stay fp32 in both.

A step is x_t production (k guided DDIM steps, each one UNet pass over the concept/empty pair) plus the
training part (one frozen pass over two conditions, one trained forward and backward, the optimizer),
timed with the trainer's own parts: `train.setup_model`, `latents.GuidedRuns` and `objective.EsdStep`.
Both parts are timed (second of two repetitions). With the paper's sampling a step makes on average
24.5 passes (k drawn from a 50-step schedule); with the fast default (one 25-step trajectory every 12
steps) it makes 24 / 12 = 2. The x_t share is the passes' time over the step time.
Results go to benchmarks/SD15_RESULTS.md and build/sd15_step/results.json.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from esd_lora.recipe import TrainSection

ROOT = Path(__file__).resolve().parents[1]
MEAN_K = 24.5  # average DDIM index k drawn uniformly from a 50-step schedule
_DEFAULTS = TrainSection()
FAST_PASSES = (_DEFAULTS.ddim_steps - 1) / _DEFAULTS.refresh_every  # guided passes per step, fast default


def one(mode: str, precision: str) -> dict:
    """Build, then time one step twice with the trainer's own parts (model setup, latent sampling and
    ESD step); returns the second timing and the process's peak memory."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from esd_lora.latents import GuidedRuns, LatentBatch
    from esd_lora.objective import EsdStep
    from esd_lora.recipe import from_dict
    from esd_lora.train import make_optimizer, setup_model

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    lora = mode == "esd-lora"
    recipe = from_dict({"concept": {"prompts": ["concept"]}, "adapter": {"kind": "lora" if lora else "none"},
                        "train": {"optimizer": "adamw8bit" if lora else "adam", "lr": 1e-5}})
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768).to(dtype)  # SD 1.5's block layout
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    model = setup_model(recipe, unet)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=True)
    student, optimizer = accelerator.prepare(unet, make_optimizer(recipe.train.optimizer, model.params, 1e-5))
    gen = torch.Generator().manual_seed(0)
    embeddings = {p: torch.randn(1, 77, 768, generator=gen).to(dtype) for p in ("concept", "")}

    def conditioner(prompts: list[str]) -> dict:  # random text embeddings stand in for CLIP's
        return {"encoder_hidden_states": torch.cat([embeddings[p] for p in prompts])}

    runs = GuidedRuns(conditioner, scheduler, ["concept"], [], 1, 50, 3.0, (4, 32, 32), dtype, torch.device("cpu"))
    esd = EsdStep(recipe.concept, conditioner, scheduler, 1)
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        x_t = runs.run(unet, [0], 1, gen)[-1]  # one guided DDIM pass over the concept/empty pair, as train() samples
        pass_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss = esd.loss(student, model.teacher, LatentBatch(x_t, [25], [0]), torch.tensor([500]), random.Random(0),
                        accelerator.autocast)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append((pass_seconds, time.perf_counter() - t0))
    pass_seconds, train_seconds = timings[-1]
    step = MEAN_K * pass_seconds + train_seconds
    fast = FAST_PASSES * pass_seconds + train_seconds
    return {"mode": mode, "precision": precision, "trainable_params": sum(p.numel() for p in model.params),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "pass_seconds": round(pass_seconds, 3), "train_seconds": round(train_seconds, 3),
            "step_seconds": round(step, 2), "xt_share": round(MEAN_K * pass_seconds / step, 3),
            "fast_step_seconds": round(fast, 2), "fast_xt_share": round(FAST_PASSES * pass_seconds / fast, 3)}


def report(rows: list[dict]) -> str:
    from esd_lora import __version__

    lines = ["# One ESD step on the SD 1.5 UNet (CPU)", "",
             f"`python benchmarks/sd15_step.py` on {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, esd-lora {__version__}. Random weights, SD 1.5 architecture, 32x32 "
             "latents, batch 1, `esd-x` targets. A step is the guided DDIM passes that produce x_t plus the "
             f"training part: {MEAN_K} passes with the paper's sampling (average k of a 50-step schedule), "
             f"{FAST_PASSES:g} with esd-lora's fast default. Each configuration runs in its own process.", "",
             "| method | precision | trainable params | peak RSS (MB) | DDIM pass (s) | training part (s) | "
             "step, paper sampling (s) | x_t share | step, fast sampling (s) | x_t share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['precision']} | {r['trainable_params']:,} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['pass_seconds']} | {r['train_seconds']} | {r['step_seconds']} | {r['xt_share']:.0%} | "
                     f"{r['fast_step_seconds']} | {r['fast_xt_share']:.0%} |")
    lines += ["", "| precision | memory, esd-lora / classic | step time, esd-lora / classic (both paper sampling) | "
              "step time, esd-lora fast / classic |", "|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        lora, classic = (next(r for r in rows if r["mode"] == m and r["precision"] == precision)
                         for m in ("esd-lora", "classic"))
        lines.append(f"| {precision} | {lora['peak_rss_mb'] / classic['peak_rss_mb']:.2f} | "
                     f"{lora['step_seconds'] / classic['step_seconds']:.2f} | "
                     f"{lora['fast_step_seconds'] / classic['step_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
        return
    from esd_lora.io import atomic_write_json, atomic_write_text

    rows = []
    for precision in ("fp32", "bf16"):
        for mode in ("esd-lora", "classic"):
            done = subprocess.run([sys.executable, __file__, "--one", mode, precision], check=True,
                                  capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    (ROOT / "build" / "sd15_step").mkdir(parents=True, exist_ok=True)
    atomic_write_json(ROOT / "build" / "sd15_step" / "results.json", rows)
    atomic_write_text(ROOT / "benchmarks" / "SD15_RESULTS.md", report(rows))
    print(report(rows))


if __name__ == "__main__":
    main()
