"""`esd-lora toy build`: train the toy world from nothing, on CPU, seeded.

Stages, each saved to the work folder so a rerun skips what is done:
1. the concept classifier (ground truth for everything after it);
2. the autoencoder, gated: the classifier must read its reconstructions as well as the renders;
3. the text encoder and UNet, trained together on the autoencoder's latents;
   3b. optionally, more training of both from stage 3's pipeline (`--unet-extra-steps`);
4. the quality table of the finished pipeline.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_dir, atomic_write_json
from .classifier import accuracy, labelled_batch, load_classifier, save_classifier, train_classifier
from .render import random_scene, render_batch, to_tensor
from .vocab import MAX_TOKENS, build_tokenizer, random_caption

GATE = 0.98  # per-head classifier accuracy the autoencoder's reconstructions must keep


@dataclass
class BuildConfig:
    """Sizes and schedules of the toy world; defaults are what the shipped model was built with."""

    seed: int = 0
    classifier_steps: int = 700
    bank_size: int = 30000
    vae_steps: int = 1200
    vae_extra_steps: int = 800  # granted once if the gate is missed
    vae_batch_size: int = 32
    unet_steps: int = 4000
    batch_size: int = 64
    unet_lr: float = 5e-4
    unet_extra_steps: int = 4000  # stage 3b, continuing from stage 3's pipeline
    unet_extra_lr: float = 3e-4
    ema_decay: float = 0.999


def vae_config() -> dict:
    """A small AutoencoderKL: 32x32x3 pixels to 8x8x8 latents (4x downsampling)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=8, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), norm_num_groups=32, mid_block_add_attention=False,
    )


def unet_config() -> dict:
    """A 3-level SD-style UNet over 8x8 latents, with attn1/attn2 named as in Stable Diffusion."""
    return dict(
        sample_size=8, in_channels=8, out_channels=8, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )


def text_config(vocab_size: int) -> dict:
    """A two-layer CLIP text encoder over the toy vocabulary."""
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=64,
    )


def scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule, so ESD timesteps mean the same here."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def _cosine(step: int, total: int, warmup: int = 0, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_classifier(work: Path, cfg: BuildConfig) -> dict[str, float]:
    path = work / "classifier.safetensors"
    if not path.exists():
        save_classifier(train_classifier(steps=cfg.classifier_steps, seed=cfg.seed), path)
    images, labels = labelled_batch(np.random.default_rng(cfg.seed + 1000), 2000)
    return accuracy(load_classifier(path), images, labels)


def train_vae(work: Path, cfg: BuildConfig, classifier) -> tuple[dict[str, float], int]:
    """Train the autoencoder until the classifier reads its reconstructions at the gate."""
    from diffusers import AutoencoderKL

    out = work / "vae"
    held_images, held_labels = labelled_batch(np.random.default_rng(cfg.seed + 2000), 1000)
    if (out / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(out)
        return _recon_accuracy(vae, classifier, held_images, held_labels), 0
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps_done = 0
    for budget in (cfg.vae_steps, cfg.vae_extra_steps):
        vae.train()
        for step in (bar := tqdm(range(budget), desc="autoencoder")):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * _cosine(step, budget, warmup=100 if steps_done == 0 else 0)
            x = to_tensor(render_batch([random_scene(rng) for _ in range(cfg.vae_batch_size)]))
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            weight = 1.0 + 4.0 * (x.max(dim=1, keepdim=True).values > -0.95).float()
            loss = (weight * (recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        steps_done += budget
        acc = _recon_accuracy(vae, classifier, held_images, held_labels)
        print(f"autoencoder after {steps_done} steps: reconstruction accuracy {acc}", flush=True)
        if min(acc.values()) >= GATE:
            break
    with atomic_dir(out) as tmp:
        vae.save_pretrained(tmp)
    return acc, steps_done


@torch.no_grad()
def _recon_accuracy(vae, classifier, images, labels) -> dict[str, float]:
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in images.split(250)])
    return accuracy(classifier, recon, labels)


def _latent_bank(vae, size: int, rng: np.random.Generator) -> tuple[list, torch.Tensor]:
    """Render `size` random scenes and encode them once; the UNet trains on these latents."""
    scenes = [random_scene(rng) for _ in range(size)]
    with torch.no_grad():
        images = to_tensor(render_batch(scenes))
        latents = torch.cat([vae.encode(x).latent_dist.mode() for x in tqdm(images.split(500), desc="encode")])
    return scenes, latents


def train_unet(work: Path, cfg: BuildConfig) -> Path:
    """Stage 3: train text encoder and UNet together from scratch; writes work/pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = work / "pipeline"
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    build_tokenizer(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    scenes, latents = _latent_bank(vae, cfg.bank_size, rng)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"latent scaling factor {scaling:.4f}", flush=True)
    text = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    unet = UNet2DConditionModel(**unet_config())
    _fit(work, out, unet, text, vae, tokenizer, scenes, latents * scaling, cfg.unet_steps, cfg.unet_lr, 200,
         cfg, rng, random.Random(cfg.seed + 3), stage="unet")
    return out


def extend_unet(work: Path, cfg: BuildConfig) -> Path:
    """Stage 3b: train stage 3's (EMA) text encoder and UNet further, on a fresh bank and a fresh cosine cycle.

    Colours and textures are learnt within 2,000 steps; shapes need far longer. Continuing from a
    finished pipeline lets the build be spread over working sessions and stay reproducible.
    """
    from diffusers import StableDiffusionPipeline

    src = work / "pipeline"
    if cfg.unet_extra_steps == 0:
        return src
    out = work / f"pipeline_plus{cfg.unet_extra_steps}"
    if (out / "model_index.json").exists():
        return out
    pipe = StableDiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(cfg.seed + 10)
    rng = np.random.default_rng(cfg.seed + 12)
    scenes, latents = _latent_bank(pipe.vae.eval(), cfg.bank_size, rng)
    _fit(work, out, pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, scenes,
         latents * pipe.vae.config.scaling_factor, cfg.unet_extra_steps, cfg.unet_extra_lr, 100, cfg, rng,
         random.Random(cfg.seed + 13), stage="unet_extra")
    return out


def _fit(work: Path, out: Path, unet, text, vae, tokenizer, scenes: list, latents: torch.Tensor, steps: int,
         lr: float, warmup: int, cfg: BuildConfig, rng: np.random.Generator, py_rng: random.Random,
         stage: str) -> None:
    """The denoising loop: epsilon loss with min-SNR-5 weighting, cosine lr, EMA; saves the EMA pipeline."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_sched = DDPMScheduler.from_config(DDIMScheduler(**scheduler_config()).config)
    params = list(unet.parameters()) + list(text.parameters())
    ema = EMAModel(params, decay=cfg.ema_decay)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    log = open(work / "unet_log.jsonl", "a")
    unet.train()
    text.train()
    t0 = time.time()
    for step in (bar := tqdm(range(steps), desc=stage)):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps, warmup=warmup)
        idx = rng.integers(0, len(scenes), cfg.batch_size)
        captions = [random_caption(scenes[i].colour, scenes[i].shape, scenes[i].texture, py_rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (cfg.batch_size,))
        pred = unet(noise_sched.add_noise(x0, noise, t), t, text(ids)[0]).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"stage": stage, "step": step, "loss": loss.item(), "time": time.time() - t0}) + "\n")
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            log.flush()
            _save_pipeline(out if step + 1 == steps else work / "pipeline_snapshot", unet, text, ema, params, vae,
                           tokenizer)
    log.close()


def _save_pipeline(out: Path, unet, text, ema, params, vae, tokenizer) -> None:
    """Save the EMA weights as a diffusers StableDiffusionPipeline, stored in fp16 to stay small."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    backup = [p.detach().clone() for p in params]
    ema.copy_to(params)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text).eval(), tokenizer=tokenizer, unet=copy.deepcopy(unet).eval(),
        scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    for p, b in zip(params, backup):
        p.data.copy_(b)
    pipe.to(torch.float16)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def build(work: str | Path, cfg: BuildConfig | None = None, install: bool = False) -> dict:
    """Run every stage; with install, copy the results into the package's weights folder."""
    import shutil

    from .paths import CLASSIFIER_PATH, MODEL_DIR

    cfg = cfg or BuildConfig()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": cfg.__dict__}
    t0 = time.time()
    report["classifier_accuracy"] = build_classifier(work, cfg)
    print(f"classifier accuracy {report['classifier_accuracy']}", flush=True)
    classifier = load_classifier(work / "classifier.safetensors")
    report["vae_reconstruction_accuracy"], report["vae_steps"] = train_vae(work, cfg, classifier)
    if min(report["vae_reconstruction_accuracy"].values()) < GATE:
        raise RuntimeError(f"autoencoder gate missed: {report['vae_reconstruction_accuracy']} < {GATE}")
    report["minutes_to_unet"] = (time.time() - t0) / 60
    train_unet(work, cfg)
    pipeline_dir = extend_unet(work, cfg)
    report["build_minutes"] = (time.time() - t0) / 60
    atomic_write_json(work / "build_report.json", report)
    if install:
        with atomic_dir(MODEL_DIR) as tmp:
            shutil.copytree(pipeline_dir, tmp, dirs_exist_ok=True)
        shutil.copyfile(work / "classifier.safetensors", CLASSIFIER_PATH)
    from .quality import quality_table

    report["quality"] = quality_table(pipeline_dir, work / "classifier.safetensors")
    atomic_write_json(work / "build_report.json", report)
    return report
