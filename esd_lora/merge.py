"""Fold erasure adapters into a base model's weights, so the erasure cannot be switched off.

The deltas are added by PEFT (`fuse_lora`), the LoRA layers are then removed (`unload_lora`) and the
pipeline is written whole, with provenance in every weight file's header and a model card.
`verify` recomputes the merge from the base and the adapters and reports how far each tensor is
from the shipped one, so a distributor can show what the weights contain.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .adapter import CLASSIC_WEIGHTS_NAME, AdapterError, adapter_file, adapter_provenance, fuse_loaded, load_adapters
from .errors import ExportError
from .export import check_single_file, save_single_file
from .io import atomic_dir, atomic_path, atomic_save_safetensors, check_output
from .models import load_pipeline
from .provenance import AdapterProvenance, BaseIdentity, MergedProvenance, base_identity, check_adapter


@dataclass
class Folded:
    """An adapter going into a merged model: its weights file, the file's sha256 and its provenance."""

    file: Path
    sha256: str
    record: AdapterProvenance


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: how a merged model names the adapters it contains."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_adapters(adapters: list[str | Path], base: BaseIdentity) -> list[Folded]:
    """Each adapter's file and provenance, after checking that it was trained for this base."""
    folded = []
    for path in adapters:
        file = adapter_file(path)
        record = adapter_provenance(file)
        check_adapter(path, record, base)
        folded.append(Folded(file, file_sha256(file), record))
    return folded


def apply_adapters(pipe, adapters: list[str | Path], weights: list[float] | None = None,
                   base: BaseIdentity | None = None) -> list[Folded]:
    """Add each adapter's weight delta (times its weight) to the UNet and, for adapters that have one, to the
    text encoder, in place: the exact sum, no cross terms."""
    from safetensors.torch import load_file

    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"--weights: give one finite weight per adapter ({len(adapters)}), not {weights}")
    base = base or base_identity(pipe)
    folded = check_adapters(adapters, base)
    lora = [(f.file, w) for f, w in zip(folded, weights) if f.file.name != CLASSIC_WEIGHTS_NAME]
    classic = [(f.file, w) for f, w in zip(folded, weights) if f.file.name == CLASSIC_WEIGHTS_NAME]
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()} if classic else {}
    if lora:
        fuse_loaded(pipe, load_adapters(pipe, [a for a, _ in lora], [w for _, w in lora], base))
    state = pipe.unet.state_dict()
    for file, weight in classic:
        with torch.no_grad():
            for key, trained in load_file(str(file)).items():
                state[key].add_(weight * (trained.to(state[key].dtype) - original[key]))
    return folded


def provenance(base: str, identity: BaseIdentity, folded: list[Folded], weights: list[float],
               strategy: str) -> dict[str, str]:
    """The safetensors header every merged weight file carries."""
    return MergedProvenance(erased=[f.record.concepts for f in folded], adapters_sha256=[f.sha256 for f in folded],
                            adapter_weights=list(weights), strategy=strategy, base_model=base,
                            base_unet_sha256=identity.unet_sha256, version=__version__).to_metadata()


def _check_finite(pipe) -> None:
    """Refuse to write weights that are NaN or infinite (an adapter trained into NaN, an overflowing dtype)."""
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component, None)
        for name, tensor in (module.state_dict().items() if module is not None else ()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise AdapterError(f"the merged weights are not finite ({component}.{name}); check the adapters, "
                                   "their --weights and --dtype")


def save_merged(pipe, out: str | Path, header: dict[str, str], card: str, single_file: str | Path | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the pipeline folder (every weight file stamped with `header`) and the model card, and optionally
    the single-file export. Both are written whole under temporary names first and then renamed one right
    after the other, so a run killed at any moment leaves the old outputs or the new ones (the two renames
    aside)."""
    from safetensors.torch import load_file

    out = Path(out)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype)
    _check_finite(pipe)
    with ExitStack() as outputs:
        single_tmp = outputs.enter_context(atomic_path(single_file)) if single_file else None
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            for file in tmp.rglob("*.safetensors"):
                atomic_save_safetensors(load_file(str(file)), file, metadata={"format": "pt", **header})
            (tmp / "README.md").write_text(card)
            if single_tmp is not None:
                save_single_file(pipe, single_tmp, header)
    return out


def base_licence(base: str) -> str:
    """The base model's licence: a named model's own, else as the model's card states it, else `other`."""
    from .models import named_models, resolve

    if base in named_models():
        return named_models()[base].licence
    card = Path(resolve(base)) / "README.md"
    if card.is_file():
        found = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
        if found:
            return found.group(1)
    return "other"


def model_card(base: str, folded: list[Folded], weights: list[float], strategy: str) -> str:
    """README.md with Hugging Face front matter; lists each erasure, its recipe and its measured figures."""
    lines = ["---", f"base_model: {base}", "base_model_relation: merge", f"license: {base_licence(base)}",
             "library_name: diffusers", "tags:", "- stable-diffusion", "- concept-erasure", "- esd", "- esd-lora",
             "---", "", f"# {Path(base).name or base} with concepts erased", "",
             f"Made with esd-lora {__version__} from `{base}` by folding in {len(folded)} erasure adapter(s) "
             f"(strategy `{strategy}`). The erasures are part of the weights: they cannot be switched off.", "",
             "| erased | recipe | eta | targets | steps | weight | adapter sha256 | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for f, weight in zip(folded, weights):
        r = f.record
        lines.append(f"| {', '.join(r.concepts)} | {r.recipe_name or '?'} | {r.eta} | {json.dumps(r.target_spec)} "
                     f"| {r.steps} | {weight} | `{f.sha256[:12]}` | {_measured(f.file)} |")
    lines += ["", "Each weight file's safetensors header records the erased concepts, the adapters' hashes, the "
              "base UNet's hash and the tool version. `esd-lora verify` recomputes the merge from the base and the "
              "adapters and reports the largest difference per tensor.", ""]
    return "\n".join(lines)


def _measured(adapter: Path) -> str:
    """The adapter's own evaluation summary (eval/report.json beside it), if it was measured."""
    report = Path(adapter).parent / "eval" / "report.json"
    if not report.is_file():
        return "not measured"
    s = json.loads(report.read_text())["summary"]
    parts = []
    if s.get("efficacy_max_detection") is not None:
        parts.append(f"erased concept detected in ≤ {s['efficacy_max_detection']:.0%} of images")
    if s.get("specificity_min_ratio") is not None:
        parts.append(f"kept concepts ≥ {s['specificity_min_ratio']:.0%} of base")
    return "; ".join(parts) or "not measured"


def merge(base: str, adapters: list[str | Path], out: str | Path, weights: list[float] | None = None,
          single_file: str | Path | None = None, allow_pickle: bool = False, dtype: str = "fp32",
          overwrite: bool = False) -> Path:
    """Fold the adapters into the base and write a complete diffusers pipeline folder (strategy `sum`).

    An existing non-empty `out` (or `single_file`) is replaced only with `overwrite`, and never when it
    holds one of the inputs."""
    from .models import DTYPES, resolve

    weights = weights or [1.0] * len(adapters)
    files = [adapter_file(path) for path in adapters]  # a missing adapter fails before the model loads
    check_output(out, [*files, resolve(base)], overwrite, "--out")
    if single_file:
        check_output(single_file, [*files, resolve(base)], overwrite, "--single-file", folder=False)
        if Path(out).resolve() in Path(single_file).resolve().parents:
            raise ExportError(f"--single-file {single_file}: it lies inside --out {out}; write it beside the folder")
        check_single_file(single_file)
    pipe = load_pipeline(base, allow_pickle=allow_pickle)
    identity = base_identity(pipe)
    folded = apply_adapters(pipe, adapters, weights, identity)
    header = provenance(base, identity, folded, weights, "sum")
    return save_merged(pipe, out, header, model_card(base, folded, weights, "sum"), single_file, DTYPES[dtype])


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a merged component's weights are stored in (esd-lora stores a whole model in one dtype)."""
    from safetensors import safe_open

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    file = next(folder.glob("*.safetensors"), None)
    if file is None:
        raise AdapterError(f"{folder.parent}: the merged model has no {folder.name} weights in safetensors to compare")
    with safe_open(str(file), framework="pt") as f:
        return dtypes.get(f.get_slice(next(iter(f.keys()))).get_dtype(), torch.float32)


def verify(merged: str | Path, base: str, adapters: list[str | Path], weights: list[float] | None = None,
           allow_pickle: bool = False) -> dict:
    """Recompute the merge and compare it with the shipped weights: the largest |difference| per tensor.

    The recomputed weights are first rounded to the dtype the shipped ones are stored in, so an honest
    fp16 or bf16 merge differs by exactly zero, as an fp32 one does."""
    from .models import resolve

    shipped = load_pipeline(str(merged), allow_pickle=allow_pickle)
    pipe = load_pipeline(base, allow_pickle=allow_pickle)
    apply_adapters(pipe, adapters, weights)
    diffs, stored = {}, {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(pipe, component, None), getattr(shipped, component, None)
        if ours is None and theirs is None:
            continue
        if ours is None or theirs is None:
            raise AdapterError(f"{merged}: its {component} does not match the base {base}'s (another family?)")
        stored[component] = dtype = _stored_dtype(Path(resolve(str(merged))) / component)
        a, b = ours.state_dict(), theirs.state_dict()
        if a.keys() != b.keys():
            extra = sorted(set(a) ^ set(b))[:3]
            raise AdapterError(f"{merged}: {component} tensors differ from the recomputed merge ({', '.join(extra)})")
        for key in a:
            diffs[f"{component}.{key}"] = (a[key].to(dtype).float() - b[key].float()).abs().max().item()
    worst = max(diffs, key=diffs.get)
    return {"merged": str(merged), "base": base, "adapters": [str(a) for a in adapters],
            "stored_dtypes": {c: str(d).removeprefix("torch.") for c, d in stored.items()},
            "max_abs_diff": diffs[worst], "worst_tensor": worst, "tensors": diffs}
