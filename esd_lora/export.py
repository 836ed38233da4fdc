"""Write erasures in the layouts other tools load.

- A merged SD 1.x/2.x or SDXL pipeline as one original-layout (LDM/SGM) safetensors file, the layout
  that A1111, ComfyUI and diffusers' `from_single_file` read.
- An adapter as a diffusers LoRA file (`pipe.load_lora_weights`) or as a kohya LoRA file
  (A1111, ComfyUI), with the `ss_*` and `modelspec.*` header kohya tools write and the adapter's real alpha.

diffusers reads these layouts but has no writer for them; the key maps below are the inverse of
its single-file converters, and the tests check them by loading the files back through diffusers.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from .adapter import LORA_METADATA_KEY, TEXT_PREFIX, TOKEN_ROWS, adapter_file, adapter_provenance
from .errors import AdapterError, ExportError
from .io import atomic_save_safetensors, check_output
from .provenance import PREFIX, AdapterProvenance, read_metadata

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L, HF layout
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, OpenCLIP layout
OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_BLOCK_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_FUSED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # in_proj's row order
CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya appends "_v" for v-pred SD 1/2
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v1_v": "stable-diffusion-v1",  # by kohya version
                           "sd_v2": "stable-diffusion-v2-512", "sd_v2_v": "stable-diffusion-v2-768-v",
                           "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}
MODELSPEC_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}
# SD 1.x and SDXL base models predict noise (kohya assumes so unless told otherwise); SD 2.x has both kinds
DEFAULT_PREDICTIONS = {"sd1": "epsilon", "sdxl": "epsilon"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


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


def _layers_per_block(cfg) -> int:
    """The resnets per UNet level; the original layout numbers its blocks by one count for every level."""
    per = cfg.layers_per_block
    if isinstance(per, int):
        return per
    if len(set(per)) != 1:
        raise ExportError(f"single-file export needs the same layers_per_block on every UNet level, not {list(per)}")
    return per[0]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under original Stable Diffusion names (SD 1.x/2.x and SDXL block layout)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    cfg = unet.config
    per = _layers_per_block(cfg)
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
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's size and pooled-text embedding
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
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


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in the HF layout original checkpoints keep it in (SD 1.x, SDXL's first encoder)."""
    # transformers 5 drops the `text_model.` level that checkpoints and their readers expect
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in text_encoder.state_dict().items()}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder with projection under OpenCLIP's names (SDXL's second encoder): q, k and v fused
    into one `in_proj`, and the projection stored as the matrix text features are multiplied by."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")
        layer = CLIP_LAYER.fullmatch(key)
        if key in OPEN_CLIP_NAMES:
            out[OPEN_CLIP_NAMES[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif layer and layer[2] in OPEN_CLIP_BLOCK_NAMES:
            out[f"transformer.resblocks.{layer[1]}.{OPEN_CLIP_BLOCK_NAMES[layer[2]]}.{layer[3]}"] = value
        elif layer and layer[2] in OPEN_CLIP_FUSED:
            qkv.setdefault(f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}", {})[layer[2]] = value
        else:
            raise ExportError(f"single-file export: no OpenCLIP name for text encoder weight {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts[name] for name in OPEN_CLIP_FUSED])
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """A whole SD 1.x/2.x or SDXL pipeline as one original-layout state dict.

    SD 1.x/2.x: the CLIP text encoder in the HF layout under `cond_stage_model.transformer.`, as SD 1.x
    checkpoints store it. SDXL: CLIP ViT-L the same way under `conditioner.embedders.0.transformer.` and
    the second encoder in OpenCLIP's layout under `conditioner.embedders.1.model.`, as SDXL 1.0 base does.
    """
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update(clip_to_ldm(pipe.text_encoder, LDM_TEXT_PREFIX))
    elif pipe.text_encoder is None:
        raise ExportError("single-file export: this SDXL pipeline has no first text encoder (a refiner?)")
    else:
        state.update(clip_to_ldm(pipe.text_encoder, SDXL_TEXT_PREFIX))
        state.update({SDXL_TEXT_2_PREFIX + k: v for k, v in open_clip_to_ldm(pipe.text_encoder_2).items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def check_single_file(path: str | Path) -> None:
    """A single-file export is a .safetensors file (checked before any heavy work)."""
    if Path(path).suffix != ".safetensors":
        raise ExportError(f"--single-file {path}: a single-file export must end in .safetensors")


def save_single_file(pipe, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the pipeline as one original-layout safetensors file at `path` exactly; the caller writes it
    under a temporary name and renames it (as `merge.save_merged` does with its folder)."""
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(pipe), str(path), metadata={"format": "pt", **metadata})
    return Path(path)


def _lora_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """An adapter's tensors, header and LoRA config; classic ESD weights are refused."""
    from safetensors.torch import load_file

    file = adapter_file(path)
    meta = read_metadata(file)
    if LORA_METADATA_KEY not in meta:
        raise AdapterError(f"adapter {path}: no LoRA config in its header (classic ESD weights cannot be exported "
                           "as a LoRA)")
    try:
        config = {k.removeprefix("unet."): v for k, v in json.loads(meta[LORA_METADATA_KEY]).items()}
    except (json.JSONDecodeError, AttributeError):
        raise AdapterError(f"adapter {path}: its LoRA config ({LORA_METADATA_KEY}) is not a JSON object") from None
    return load_file(str(file)), meta, config


def _model_name(model: str) -> str:
    """The base model as kohya records it: a local one by its file or folder name, a hub one by its id."""
    path = Path(model)
    return path.name if path.is_absolute() or model.startswith((".", "~")) or path.exists() else model


def base_model_header(record: AdapterProvenance, title: str) -> dict[str, str]:
    """What A1111 and model hubs read about the base model: kohya's `ss_*` fields and the SAI model spec
    (`modelspec.*`), as kohya's trainer writes them for a LoRA. A field the adapter's header cannot tell
    (older adapters lack some) is left out rather than guessed."""
    family = record.base_family
    if family not in KOHYA_BASE_VERSIONS:
        return {}
    prediction = record.prediction_type or DEFAULT_PREDICTIONS.get(family)
    if prediction is not None and prediction not in MODELSPEC_PREDICTIONS:
        raise ExportError(f"adapter header field {PREFIX}prediction_type is {prediction!r}; kohya and the model "
                          f"spec know {' and '.join(MODELSPEC_PREDICTIONS)}")
    started, side = record.training_started_at, record.resolution
    if not (isinstance(started, (int, float)) and math.isfinite(started) and started >= 0):
        raise ExportError(f"adapter header field {PREFIX}training_started_at is {started!r}, not a time")
    if not (isinstance(side, int) and side >= 0):
        raise ExportError(f"adapter header field {PREFIX}resolution is {side!r}, not a whole number of pixels")
    # an SD 2.x adapter of unknown prediction type still gets `sd_v2`: the family is what A1111 reads from it
    version = KOHYA_BASE_VERSIONS[family] + ("_v" if prediction == "v_prediction" and family != "sdxl" else "")
    header = {"ss_base_model_version": version, "ss_v2": str(family == "sd2")}  # A1111 tells SD 2 LoRAs by ss_v2
    if record.base_model:
        header["ss_sd_model_name"] = _model_name(record.base_model)
    if started:
        header["ss_training_started_at"] = str(started)
    if side:
        header["ss_resolution"] = str((side, side))
    if prediction is None:  # the model spec's architecture (SD 2 512 or 768-v) would be a guess
        return header
    header.update({"modelspec.sai_model_spec": MODELSPEC_VERSION,
                   "modelspec.architecture": f"{MODELSPEC_ARCHITECTURES[version]}/lora",
                   "modelspec.implementation": "diffusers",  # the tensor names are diffusers' module names
                   "modelspec.title": title, "modelspec.prediction_type": MODELSPEC_PREDICTIONS[prediction]})
    if side:
        header["modelspec.resolution"] = f"{side}x{side}"
    if started:
        header["modelspec.date"] = datetime.fromtimestamp(int(started), timezone.utc).isoformat()
    return header


def export_adapter(path: str | Path, out: str | Path, fmt: str = "kohya", overwrite: bool = False) -> Path:
    """Write an adapter as a diffusers or kohya LoRA file; every `esd_lora.*` header field is kept. An
    existing `out` is replaced only with `overwrite`, and never when it is the adapter itself."""
    from diffusers.utils import convert_state_dict_to_kohya

    check_output(out, [adapter_file(path)], overwrite, "--out", folder=False)
    record = adapter_provenance(path)
    tensors, meta, config = _lora_tensors(path)
    provenance = {k: v for k, v in meta.items() if k.startswith(PREFIX)}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: an exported adapter must end in .safetensors")
    if any(TOKEN_ROWS in k for k in tensors):
        raise ExportError(f"adapter {path}: it retrains token embeddings (adapter.concept_tokens), which no LoRA "
                          "loader reads; merge it into the model instead (esd-lora merge, --single-file)")
    if fmt == "diffusers":
        atomic_save_safetensors(tensors, out, metadata=meta)
        return out
    if fmt != "kohya":
        raise ExportError(f"unknown export format {fmt!r} (choose diffusers or kohya)")
    if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora"):
        raise ExportError("kohya export needs one rank and one alpha for every layer")
    text = {k.removeprefix(TEXT_PREFIX): v for k, v in config.items() if k.startswith(TEXT_PREFIX)}
    if text and (text.get("r"), text.get("lora_alpha")) != (config.get("r"), config.get("lora_alpha")):
        raise ExportError("kohya export needs the same rank and alpha in the UNet and the text encoder")
    kohya = convert_state_dict_to_kohya(tensors)
    if record.base_family in ("sd1", "sd2"):  # kohya names an SD 1/2 text encoder lora_te_, SDXL's two lora_te1/2_
        kohya = {re.sub(r"^lora_te1_", "lora_te_", k): v for k, v in kohya.items()}
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)  # diffusers writes alpha = rank; keep the trained scale
    header = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_training_comment": "ESD concept erasure (esd-lora)", "ss_output_name": out.stem,
        **base_model_header(record, record.recipe_name or out.stem), **provenance,
    }
    atomic_save_safetensors(kohya, out, metadata=header)
    return out
