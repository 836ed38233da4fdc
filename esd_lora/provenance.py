"""Provenance: what an adapter or a merged model says about itself, and whether an adapter fits a base.

Every weight file esd-lora writes carries a record in its safetensors header, under `esd_lora.*` keys:
an adapter says what it erased, how, and for which base model; a merged model says which adapters it
contains. This module is the only one that knows those keys. The base model is identified by the
sha256 of its UNet weights *as stored* (names, shapes and values widened to fp32), so an adapter
trained on a base loaded in fp16 or bf16 fits the same base loaded in fp32, and the reverse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import AdapterError, reason

PREFIX = "esd_lora."
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_INDEX = UNET_WEIGHTS + ".index.json"
PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "bitsandbytes", "safetensors")


@dataclass(frozen=True)
class BaseIdentity:
    """What an adapter must match in the model it is applied to, and what consumers of an export read."""

    unet_sha256: str
    family: str  # sd1, sd2 or sdxl
    prediction_type: str  # epsilon or v_prediction
    resolution: int  # pixels of one side of the native image size


class _Record:
    """A dataclass written as `esd_lora.<field>` header keys: strings as they are, everything else as JSON."""

    def to_metadata(self) -> dict[str, str]:
        hints = typing.get_type_hints(type(self))
        return {PREFIX + f.name: (value if hints[f.name] is str else json.dumps(value))
                for f in dataclasses.fields(self) for value in [getattr(self, f.name)]}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str | Path):
        """The record in a header; missing keys take their defaults (files from older versions)."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            raw = meta.get(PREFIX + f.name)
            if raw is None:
                continue
            try:
                values[f.name] = raw if hints[f.name] is str else json.loads(raw)
            except json.JSONDecodeError:
                raise AdapterError(f"{source}: header key {PREFIX + f.name} is not valid JSON") from None
        return cls(**values)


@dataclass
class AdapterProvenance(_Record):
    """An adapter's record: the erasure (prompts, eta, layers, steps) and the base it was trained on."""

    concepts: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)
    erase_from: list[str] = field(default_factory=list)
    eta: float = 1.0
    targets: list[str] = field(default_factory=list)
    target_spec: str | list[str] = ""
    steps: int = 0
    recipe_name: str = ""
    base_model: str = ""
    base_revision: str = ""
    base_unet_sha256: str = ""
    base_family: str = ""
    prediction_type: str = ""
    resolution: int = 0
    training_started_at: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_base(cls, base: BaseIdentity, **fields) -> AdapterProvenance:
        """A record for an erasure trained on `base` now, with the package versions that made it."""
        return cls(base_unet_sha256=base.unet_sha256, base_family=base.family, prediction_type=base.prediction_type,
                   resolution=base.resolution, versions=package_versions(), **fields)


@dataclass
class MergedProvenance(_Record):
    """A merged model's record: the adapters folded in (by file hash), their weights and the base."""

    erased: list[list[str]] = field(default_factory=list)
    adapters_sha256: list[str] = field(default_factory=list)
    adapter_weights: list[float] = field(default_factory=list)
    strategy: str = ""
    base_model: str = ""
    base_unet_sha256: str = ""
    version: str = ""


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what an adapter is, for provenance and benchmark reports."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"esd-lora": __version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a weight file; a file that is not safetensors is a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({reason(err)})") from None


def _stored_unet_files(pipe) -> list[Path]:
    """The safetensors files the pipeline's UNet was loaded from, if it was loaded from a folder."""
    folder = Path(getattr(pipe, "name_or_path", None) or "") / "unet"
    if (folder / UNET_INDEX).is_file():
        shards = json.loads((folder / UNET_INDEX).read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(shards))]
    return [folder / UNET_WEIGHTS] if (folder / UNET_WEIGHTS).is_file() else []


def unet_sha256(pipe) -> str:
    """sha256 of the base UNet's weights as stored, in name order, each widened to fp32.

    A UNet loaded from a safetensors folder is hashed from its files, so the load dtype does not matter;
    one built in memory or read from a pickle is hashed as it is in memory (LoRA layers skipped)."""
    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    files = _stored_unet_files(pipe)
    if files:
        from safetensors import safe_open

        with ExitStack() as opened:
            handles = [opened.enter_context(safe_open(str(file), framework="pt")) for file in files]
            where = {key: handle for handle in handles for key in handle.keys()}
            for key in sorted(where):
                add(key, where[key].get_tensor(key))
        return digest.hexdigest()
    for name, tensor in sorted(pipe.unet.state_dict().items()):
        if "lora_" not in name:
            add(name.replace(".base_layer.", "."), tensor)
    return digest.hexdigest()


def base_identity(pipe) -> BaseIdentity:
    """The identity of a loaded base pipeline (hash its UNet once and pass this along)."""
    from .models import version

    return BaseIdentity(unet_sha256(pipe), version(pipe), pipe.scheduler.config.get("prediction_type", "epsilon"),
                        pipe.unet.config.sample_size * pipe.vae_scale_factor)


def require_provenance(path: str | Path, record: AdapterProvenance) -> None:
    """Refuse an adapter whose header does not say which base it was trained for."""
    if not record.base_unet_sha256:
        raise AdapterError(f"adapter {path}: its header has no esd-lora provenance, so its base model is unknown")


def check_adapter(path: str | Path, record: AdapterProvenance, base: BaseIdentity) -> None:
    """The one compatibility check before an adapter is loaded, merged, stacked or exported onto a base."""
    require_provenance(path, record)
    if record.base_family and record.base_family != base.family:
        raise AdapterError(f"adapter {path}: trained for an {record.base_family} model, the base is {base.family}")
    if record.base_unet_sha256 != base.unet_sha256:
        raise AdapterError(f"adapter {path}: trained for another base model (UNet hash "
                           f"{record.base_unet_sha256[:12]}, this model {base.unet_sha256[:12]})")
