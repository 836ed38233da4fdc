"""Model loading: the one place that turns a model name into a diffusers pipeline.

Accepts a named model from a plug-in (`toy`, the shipped toy world), a local diffusers folder, or a hub id. Failures are
one-line errors that say what could not be reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ModelLoadError, reason

TOY = "toy"  # the default model: the toy world's, a plug-in (see `named_models`)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class NamedModel:
    """A model known by a short name, contributed by a plug-in: where its pipeline folder is, how to read
    its concepts back from images (a `evaluate.Scorer`, or None), its licence, how to get it if missing, and
    (optionally) images of a concept that `attack` fits learned tokens to: images(concept, n, seed) -> a
    tensor (n, 3, H, W) in [-1, 1] and a caption of each with `{}` where the concept is said."""

    folder: Callable[[], Path]
    scorer: Callable[[], Any] | None = None
    licence: str = "other"
    missing: str = ""
    images: Callable[[str, int, int], Any] | None = None


def named_models() -> dict[str, NamedModel]:
    """Models known by name, from the installed plug-ins (entry point group `esd_lora_models`; the toy world
    is one)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group="esd_lora_models")}


def resolve(model: str) -> str:
    """The path or hub id a model name stands for (a named model's folder, else the name itself)."""
    named = named_models().get(model)
    if named is None:
        return model
    folder = named.folder()
    if not (folder / "model_index.json").exists():
        raise ModelLoadError(f"the {model} model is missing from {folder}; {named.missing}")
    return str(folder)


def family(pipe) -> str:
    """'sdxl' for pipelines with two text encoders, else 'sd'."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def version(pipe) -> str:
    """'sd1', 'sd2' or 'sdxl': the base family an adapter or a merged file belongs to."""
    if family(pipe) == "sdxl":
        return "sdxl"
    config = pipe.unet.config
    return "sd2" if config.use_linear_projection or config.cross_attention_dim == 1024 else "sd1"


def load_pipeline(model: str = TOY, dtype: str | torch.dtype = "fp32", revision: str | None = None,
                  device: str | torch.device = "cpu", allow_pickle: bool = False):
    """Load an SD-family pipeline (SD 1.x, 2.x or SDXL) with no safety checker and a quiet progress bar.

    Weights are read from safetensors only: a pickle checkpoint can run code when loaded, so it is
    refused unless `allow_pickle` says the user trusts it.
    """
    from diffusers import DiffusionPipeline

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = resolve(model)
    local = Path(source).exists()
    if Path(source).suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(f"refusing to load pickle checkpoint {source} (it can run code); convert it to "
                             "safetensors, or give `merge` / `verify` --allow-pickle if you trust it")
    if not local and source.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"cannot load model {model!r}: no such folder")
    if local and not (Path(source) / "model_index.json").exists():
        raise ModelLoadError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    try:
        if not local:  # load from the local snapshot, so the stored weights can be hashed (provenance)
            source = DiffusionPipeline.download(source, revision=revision, use_safetensors=not allow_pickle,
                                                safety_checker=None)
        kwargs = {"dtype": torch_dtype, "use_safetensors": not allow_pickle}
        if "safety_checker" in json.loads((Path(source) / "model_index.json").read_text()):
            kwargs["safety_checker"] = None
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {model!r}: {reason(err)}") from None
    if not hasattr(pipe, "unet"):
        raise ModelLoadError(f"{model!r} is a {type(pipe).__name__}; esd-lora needs a UNet-based SD-family model")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class Conditioner:
    """Text conditioning for SD 1.x/2.x and SDXL, computed once per prompt and cached.

    A frozen text encoder never changes a prompt's embedding, so it is cached. When the erasure adapts the
    text encoder too (`cache=False`), every call encodes again, differentiably where gradients are on.
    SDXL adds pooled text embeddings and size/crop ids; for the empty prompt it uses zeros when the
    model is configured so (`force_zeros_for_empty_prompt`), exactly as its pipeline samples.
    """

    def __init__(self, pipe, device: str | torch.device, dtype: torch.dtype, cache: bool = True) -> None:
        self.pipe, self.device, self.dtype, self.use_cache = pipe, device, dtype, cache
        self.sdxl = family(pipe) == "sdxl"
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _encode(self, prompt: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            embeds, _ = self.pipe.encode_prompt(prompt, self.device, 1, do_classifier_free_guidance=False)
            return embeds.to(self.dtype), None
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        if prompt == "" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds.to(self.dtype), pooled.to(self.dtype)

    def __call__(self, prompts: list[str]) -> dict:
        """UNet keyword arguments (encoder_hidden_states, added_cond_kwargs) for a batch of prompts."""
        if not self.use_cache:  # single-encoder models only (select_text_modules)
            return {"encoder_hidden_states": self._encode(list(prompts))[0]}
        for p in prompts:
            if p not in self.cache:
                with torch.no_grad():
                    self.cache[p] = self._encode(p)
        embeds = torch.cat([self.cache[p][0] for p in prompts])
        if not self.sdxl:
            return {"encoder_hidden_states": embeds}
        pooled = torch.cat([self.cache[p][1] for p in prompts])
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}}


def cat_conditions(conds: list[dict]) -> dict:
    """Concatenate condition batches, so that several predictions take one UNet call."""
    out = {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds])}
    if "added_cond_kwargs" in conds[0]:
        out["added_cond_kwargs"] = {k: torch.cat([c["added_cond_kwargs"][k] for c in conds])
                                    for k in conds[0]["added_cond_kwargs"]}
    return out
