"""Memory and time of one ESD training step on the full-size SD 1.5 UNet, esd-lora against classic ESD.

    python benchmarks/sd15_step.py            # all four configurations, each in its own process

The UNet has SD 1.5's public architecture with random weights (no download), on CPU, at 32x32 latents,
batch 1, targets `esd-x` (cross-attention). esd-lora: LoRA rank 4 on those layers, the same UNet with
adapters off as teacher, AdamW8bit. Classic ESD: the layers' full weights trained, a frozen copy of the
UNet as teacher, Adam. `bf16` keeps the frozen weights in bf16 and runs under accelerate's bf16 autocast;
trainable weights stay fp32 in both.

A step is x_t production (k guided DDIM steps, each one UNet pass over the concept/empty pair) plus the
training part (one frozen pass over two conditions, one trained forward and backward, the optimizer).
Both parts are timed (second of two repetitions). With the paper's sampling a step makes on average
24.5 passes (k drawn from a 50-step schedule); with the fast default (one 25-step trajectory every 12
steps) it makes 24 / 12 = 2. The x_t share is the passes' time over the step time.
Results go to benchmarks/SD15_RESULTS.md and build/sd15_step/results.json.
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from esd_lora.recipe import TrainSection

ROOT = Path(__file__).resolve().parents[1]
MEAN_K = 24.5  # average DDIM index k drawn uniformly from a 50-step schedule
_DEFAULTS = TrainSection()
FAST_PASSES = (_DEFAULTS.ddim_steps - 1) / _DEFAULTS.refresh_every  # guided passes per step, fast default


def one(mode: str, precision: str) -> dict:
    """Build, then time one step twice; returns the second timing and the process's peak memory."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from esd_lora.adapter import lora_config, select_modules
    from esd_lora.objective import adapters_off, esd_loss, esd_target, frozen_predictions
    from esd_lora.sampler import sample_trajectory, unet_eps
    from esd_lora.train import make_optimizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768).to(dtype)  # SD 1.5's block layout
    unet.requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    modules = select_modules(unet, "esd-x")
    if mode == "esd-lora":
        unet.add_adapter(lora_config(4, 4, 0.0, "default", modules))
        teacher = lambda: adapters_off(unet)  # noqa: E731
    else:
        frozen = copy.deepcopy(unet)
        teacher = lambda: nullcontext(frozen)  # noqa: E731
        for name in modules:
            unet.get_submodule(name).requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=True)
    optimizer = make_optimizer("adamw8bit" if mode == "esd-lora" else "adam", params, 1e-5)
    student, optimizer = accelerator.prepare(unet, optimizer)
    gen = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=gen).to(dtype)}
    empty = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=gen).to(dtype)}
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        with accelerator.autocast():
            x_t = sample_trajectory(unet, scheduler, cond, empty, 1, 50, 3.0, gen, (1, 4, 32, 32), dtype,
                                    "cpu")[-1]
        pass_seconds = time.perf_counter() - t0
        t = torch.tensor([500])
        t0 = time.perf_counter()
        with teacher() as teacher_unet, accelerator.autocast():
            preds = frozen_predictions(teacher_unet, scheduler, [x_t, x_t], t, [cond, empty])
        target = esd_target(preds[0], preds[1], 1.0)
        with accelerator.autocast():
            loss = esd_loss(unet_eps(student, scheduler, x_t, t, cond), target)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append((pass_seconds, time.perf_counter() - t0))
    pass_seconds, train_seconds = timings[-1]
    step = MEAN_K * pass_seconds + train_seconds
    fast = FAST_PASSES * pass_seconds + train_seconds
    return {"mode": mode, "precision": precision, "trainable_params": sum(p.numel() for p in params),
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
