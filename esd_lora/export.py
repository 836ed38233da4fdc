"""Write erasures in the layouts other tools load.

- A merged SD 1.x/2.x pipeline as one original-layout (LDM) safetensors file, the layout that
  A1111, ComfyUI and diffusers' `from_single_file` read.
- An adapter as a diffusers LoRA file (`pipe.load_lora_weights`) or as a kohya LoRA file
  (A1111, ComfyUI), with the `ss_*` header kohya tools expect and the adapter's real alpha.

diffusers reads these layouts but has no writer for them; the key maps below are the inverse of
its single-file converters, and the tests check them by loading the files back through diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapter import LORA_METADATA_KEY, AdapterError, adapter_file, read_metadata
from .io import atomic_save_safetensors

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class ExportError(ValueError):
    """A model or adapter cannot be written in the requested layout."""


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Replace the longest matching block prefix, then the layer name inside the block."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old):]
            if inner:
                layer, _, param = rest.rpartition(".")
                rest = f"{inner.get(layer, layer)}.{param}"
            return prefixes[old] + rest
    return None


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under original Stable Diffusion names (SD 1.x/2.x block layout)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    cfg = unet.config
    per = cfg.layers_per_block
    if not isinstance(per, int) or cfg.get("addition_embed_type") is not None:
        raise ExportError("single-file export supports SD 1.x/2.x UNets only (this one has SDXL-style blocks)")
    levels = len(cfg.block_out_channels)
    resnets, others = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}, {
        "mid_block.attentions.0.": "middle_block.1."}
    for i in range(levels):
        for j in range(per):
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.0."
            others[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.1."
        if i < levels - 1:
            others[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
        for j in range(per + 1):
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            others[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per + 1) * i + j}.1."
        if i < levels - 1:
            slot = 2 if "CrossAttn" in cfg.up_block_types[i] else 1
            others[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{(per + 1) * i + per}.{slot}.conv."
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    out = {}
    for key, value in unet.state_dict().items():
        new = fixed.get(key) or _rename(key, resnets, UNET_RESNET_NAMES) or _rename(key, others)
        if new is None:
            raise ExportError(f"single-file export: no original-layout name for UNet weight {key}")
        out[LDM_UNET_PREFIX + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under original Stable Diffusion names."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    levels = len(vae.config.block_out_channels)
    resnets = {f"{part}.mid_block.resnets.{j}.": f"{part}.mid.block_{j + 1}." for part in ("encoder", "decoder")
               for j in (0, 1)}
    attentions = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    others = {}
    for i in range(levels):
        resnets[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        others[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        resnets[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{levels - 1 - i}.block."
        others[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for key, value in vae.state_dict().items():
        if key in fixed:
            new = fixed[key]
        elif (new := _rename(key, attentions, VAE_ATTENTION_NAMES)) is not None:
            value = value[:, :, None, None] if value.dim() == 2 else value  # LDM attention uses 1x1 convs
        else:
            new = _rename(key.replace(".conv_shortcut.", ".nin_shortcut."), resnets) or _rename(key, others)
        if new is None:
            raise ExportError(f"single-file export: no original-layout name for autoencoder weight {key}")
        out[LDM_VAE_PREFIX + new] = value
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """A whole SD 1.x/2.x pipeline as one original-layout state dict (CLIP text encoder in the HF layout
    under `cond_stage_model.transformer.`, as SD 1.x checkpoints store it)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ExportError("single-file export supports SD 1.x/2.x pipelines; this one is SDXL")
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for key, value in pipe.text_encoder.state_dict().items():  # transformers 5 drops the `text_model.` level
        state[LDM_TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}")] = value
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_single_file(pipe, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the pipeline as one original-layout safetensors file, crash-safely."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: a single-file export must end in .safetensors")
    atomic_save_safetensors(pipeline_to_ldm(pipe), path, metadata={"format": "pt", **metadata})
    return path


def _lora_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """An adapter's tensors, header and LoRA config; classic ESD weights are refused."""
    from safetensors.torch import load_file

    file = adapter_file(path)
    meta = read_metadata(file)
    if LORA_METADATA_KEY not in meta:
        raise AdapterError(f"adapter {path}: no LoRA config in its header (classic ESD weights cannot be exported "
                           "as a LoRA)")
    config = {k.removeprefix("unet."): v for k, v in json.loads(meta[LORA_METADATA_KEY]).items()}
    return load_file(str(file)), meta, config


def export_adapter(path: str | Path, out: str | Path, fmt: str = "kohya") -> Path:
    """Write an adapter as a diffusers or kohya LoRA file; every `esd_lora.*` header field is kept."""
    from diffusers.utils import convert_state_dict_to_kohya

    tensors, meta, config = _lora_tensors(path)
    provenance = {k: v for k, v in meta.items() if k.startswith("esd_lora.")}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: an exported adapter must end in .safetensors")
    if fmt == "diffusers":
        atomic_save_safetensors(tensors, out, metadata=meta)
        return out
    if fmt != "kohya":
        raise ExportError(f"unknown export format {fmt!r} (choose diffusers or kohya)")
    if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora"):
        raise ExportError("kohya export needs one rank and one alpha for every layer")
    kohya = convert_state_dict_to_kohya(tensors)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)  # diffusers writes alpha = rank; keep the trained scale
    header = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": KOHYA_BASE_VERSIONS.get(meta.get("esd_lora.base_family", "sd1"), "sd_v1"),
        "ss_training_comment": "ESD concept erasure (esd-lora)",
        "ss_output_name": out.stem, **provenance,
    }
    atomic_save_safetensors(kohya, out, metadata=header)
    return out
