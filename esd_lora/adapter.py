"""Which UNet layers an erasure trains, and the adapter files it writes.

Presets follow the ESD paper: `esd-x` trains cross-attention (prompt-specific erasure, for
styles), `esd-u` everything else but the time embedding and output layers (prompt-independent,
for nudity and objects). A selection that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, TargetError, reason
from .provenance import (AdapterProvenance, BaseIdentity, base_identity, check_adapter, read_metadata,
                         require_provenance)

ADAPTER_NAME = "esd"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) finds it
CLASSIC_WEIGHTS_NAME = "esd_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers reads the LoRA config (rank, alpha) from

PRESETS: dict[str, str] = {
    "esd-x": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",
    "esd-x-strict": r".*attn2\.(to_k|to_v)",
    "esd-u": r"(?!.*attn2\.)(?!time_embedding\.)(?!add_embedding\.)(?!conv_out$).*",
    "esd-all": r".*",
}
TRAINABLE_TYPES = (nn.Linear, nn.Conv2d)


def select_modules(unet: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the Linear/Conv2d layers a preset, a regex (full match) or a list of names selects.

    List entries match a layer's full name or its dotted suffix (`attn2.to_k`).
    """
    names = [name for name, module in unet.named_modules() if isinstance(module, TRAINABLE_TYPES)]
    if isinstance(targets, str):
        pattern = PRESETS.get(targets, targets)
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise TargetError(f"adapter.targets: {targets!r} is neither a preset ({', '.join(PRESETS)}) "
                              f"nor a valid regex ({err})") from None
        chosen = [n for n in names if regex.fullmatch(n)]
        if not chosen:
            raise TargetError(f"adapter.targets: {targets!r} selects no Linear or Conv2d layer of this UNet")
        return chosen
    chosen = []
    for entry in targets:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise TargetError(f"adapter.targets: {entry!r} matches no Linear or Conv2d layer of this UNet")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def lora_config(rank: int, alpha: float, dropout: float, init: str, modules: list[str]):
    """A PEFT LoraConfig whose B matrices start at zero, so the adapter starts as the identity."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=modules,
        init_lora_weights=True if init == "default" else "gaussian",
    )


def save_lora(unet: nn.Module, path: str | Path, metadata: dict[str, str]) -> None:
    """Write the adapter in diffusers' LoRA format (`unet.`-prefixed PEFT keys, config in the header)."""
    from peft.utils import get_peft_model_state_dict

    from .io import atomic_save_safetensors

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    config = unet.peft_config[ADAPTER_NAME].to_dict()
    config = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    header = {"format": "pt", LORA_METADATA_KEY: json.dumps(config, sort_keys=True), **metadata}
    tensors = {f"unet.{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}
    atomic_save_safetensors(tensors, path, metadata=header)


def adapter_file(path: str | Path) -> Path:
    """The weights file of an adapter given as a folder or a file."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, CLASSIC_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise AdapterError(f"adapter {path}: no {WEIGHTS_NAME} in this folder")
    if not path.is_file():
        raise AdapterError(f"adapter {path}: no such file or folder")
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter {path}: only .safetensors adapters are read")
    return path


def adapter_provenance(path: str | Path) -> AdapterProvenance:
    """The provenance record in an adapter's header (a folder or a file), after checking that it has one and
    that every tensor the header lists can be read, so a foreign or damaged file fails here, before any
    heavy work."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = adapter_file(path)
    record = AdapterProvenance.from_metadata(read_metadata(file), file)
    require_provenance(path, record)
    try:
        load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"adapter {file}: its tensors cannot be read ({reason(err)})") from None
    return record


def preserve_prompts(path: str | Path, record: AdapterProvenance) -> list[str]:
    """The preserve prompts an adapter was trained with: from its header (`record`, already read), or for
    adapters whose header predates that field, from the resolved recipe saved beside it."""
    from .recipe import load_recipe

    recipe = adapter_file(path).parent / "recipe.yaml"
    if record.preserve or not recipe.is_file():
        return record.preserve
    return load_recipe(recipe).concept.preserve


def load_adapters(pipe, paths: list[str | Path], weights: list[float] | None = None,
                  base: BaseIdentity | None = None) -> list[str]:
    """Load LoRA adapters into the pipeline's UNet and activate them together, after checking that each
    was trained for this base (`base`, when the caller has hashed it already)."""
    if not paths:
        return []
    base = base or base_identity(pipe)
    names = []
    for i, path in enumerate(paths):
        file = adapter_file(path)
        check_adapter(path, adapter_provenance(file), base)
        if file.name == CLASSIC_WEIGHTS_NAME:
            raise AdapterError(f"adapter {path}: classic ESD weights are not a LoRA adapter; merge them instead")
        name = f"erase_{i}"
        pipe.unet.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet", adapter_name=name)
        names.append(name)
    pipe.unet.set_adapters(names, weights=weights or [1.0] * len(names))
    return names
