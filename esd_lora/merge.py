"""Fold erasure adapters into a base model's weights, so the erasure cannot be switched off.

The deltas are added by PEFT (`fuse_lora`), the LoRA layers are then removed (`unload_lora`) and the
pipeline is written whole, with provenance in every weight file's header and a model card.
`verify` recomputes the merge from the base and the adapters and reports how far each tensor is
from the shipped one, so a distributor can show what the weights contain.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from . import __version__
from .adapter import CLASSIC_WEIGHTS_NAME, AdapterError, adapter_file, load_adapters, read_metadata, unet_hash
from .io import atomic_dir, atomic_save_safetensors
from .models import load_pipeline, version


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: how a merged model names the adapters it contains."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_adapters(pipe, adapters: list[str | Path], base_hash: str) -> list[dict[str, str]]:
    """Each adapter's header, after checking it exists and was trained for this base (`base_hash`, the
    pipeline's UNet hash) and family."""
    base_family = version(pipe)
    headers = []
    for path in adapters:
        file = adapter_file(path)
        meta = read_metadata(file)
        family = meta.get("esd_lora.base_family")
        if family and family != base_family:
            raise AdapterError(f"adapter {path}: trained for an {family} model, the base is {base_family}")
        recorded = meta.get("esd_lora.base_unet_sha256")
        if recorded and recorded != base_hash:
            raise AdapterError(f"adapter {path}: trained for another base model (UNet hash {recorded[:12]}, "
                               f"this model {base_hash[:12]})")
        headers.append({**meta, "file": str(file), "sha256": file_sha256(file)})
    return headers


def apply_adapters(pipe, adapters: list[str | Path], weights: list[float] | None = None,
                   base_hash: str | None = None) -> list[dict[str, str]]:
    """Add each adapter's weight delta (times its weight) to the UNet, in place: the exact sum, no cross terms."""
    from safetensors.torch import load_file

    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    base_hash = base_hash or unet_hash(pipe.unet)
    headers = check_adapters(pipe, adapters, base_hash)
    lora = [(a, w) for a, w, h in zip(adapters, weights, headers) if Path(h["file"]).name != CLASSIC_WEIGHTS_NAME]
    classic = [(h, w) for h, w in zip(headers, weights) if Path(h["file"]).name == CLASSIC_WEIGHTS_NAME]
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()} if classic else {}
    if lora:
        names = load_adapters(pipe, [a for a, _ in lora], [w for _, w in lora], base_hash)
        pipe.unet.fuse_lora(adapter_names=names)
        pipe.unet.unload_lora()
    state = pipe.unet.state_dict()
    for header, weight in classic:
        with torch.no_grad():
            for key, trained in load_file(header["file"]).items():
                state[key].add_(weight * (trained.to(state[key].dtype) - base[key]))
    return headers


def provenance(base: str, base_hash: str, headers: list[dict[str, str]], weights: list[float],
               strategy: str) -> dict[str, str]:
    """The safetensors header every merged weight file carries."""
    return {
        "esd_lora.erased": json.dumps([json.loads(h.get("esd_lora.concepts", "[]")) for h in headers]),
        "esd_lora.adapters_sha256": json.dumps([h["sha256"] for h in headers]),
        "esd_lora.adapter_weights": json.dumps(weights),
        "esd_lora.strategy": strategy,
        "esd_lora.base_model": base,
        "esd_lora.base_unet_sha256": base_hash,
        "esd_lora.version": __version__,
    }


def save_merged(pipe, out: str | Path, header: dict[str, str], card: str, single_file: str | Path | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the pipeline folder (every weight file stamped with `header`) and the model card; optionally
    the single-file export too. The folder appears whole or not at all."""
    from safetensors.torch import load_file

    from .export import save_single_file

    out = Path(out)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for file in tmp.rglob("*.safetensors"):
            atomic_save_safetensors(load_file(str(file)), file, metadata={"format": "pt", **header})
        (tmp / "README.md").write_text(card)
        if single_file:
            save_single_file(pipe, single_file, header)
    return out


def base_licence(base: str) -> str:
    """The base model's licence as its own model card states it, `apache-2.0` for the toy, else `other`."""
    from .models import TOY, resolve

    if base == TOY:
        return "apache-2.0"
    card = Path(resolve(base)) / "README.md"
    if card.is_file():
        found = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
        if found:
            return found.group(1)
    return "other"


def model_card(base: str, headers: list[dict[str, str]], weights: list[float], strategy: str) -> str:
    """README.md with Hugging Face front matter; lists each erasure, its recipe and its measured figures."""
    lines = ["---", f"base_model: {base}", "base_model_relation: merge", f"license: {base_licence(base)}",
             "library_name: diffusers", "tags:", "- stable-diffusion", "- concept-erasure", "- esd", "- esd-lora",
             "---", "", f"# {Path(base).name or base} with concepts erased", "",
             f"Made with esd-lora {__version__} from `{base}` by folding in {len(headers)} erasure adapter(s) "
             f"(strategy `{strategy}`). The erasures are part of the weights: they cannot be switched off.", "",
             "| erased | recipe | eta | targets | steps | weight | adapter sha256 | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for header, weight in zip(headers, weights):
        concepts = ", ".join(json.loads(header.get("esd_lora.concepts", "[]")))
        lines.append(f"| {concepts} | {header.get('esd_lora.recipe_name', '?')} | {header.get('esd_lora.eta', '?')} "
                     f"| {header.get('esd_lora.target_spec', '?')} | {header.get('esd_lora.steps', '?')} | {weight} "
                     f"| `{header['sha256'][:12]}` | {_measured(header['file'])} |")
    lines += ["", "Each weight file's safetensors header records the erased concepts, the adapters' hashes, the "
              "base UNet's hash and the tool version. `esd-lora verify` recomputes the merge from the base and the "
              "adapters and reports the largest difference per tensor.", ""]
    return "\n".join(lines)


def _measured(adapter: str) -> str:
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
          single_file: str | Path | None = None, allow_pickle: bool = False, dtype: str = "fp32") -> Path:
    """Fold the adapters into the base and write a complete diffusers pipeline folder (strategy `sum`)."""
    from .models import DTYPES

    weights = weights or [1.0] * len(adapters)
    for path in adapters:
        adapter_file(path)  # a missing adapter fails before the model loads
    pipe = load_pipeline(base, allow_pickle=allow_pickle)
    base_hash = unet_hash(pipe.unet)
    headers = apply_adapters(pipe, adapters, weights, base_hash)
    header = provenance(base, base_hash, headers, weights, "sum")
    return save_merged(pipe, out, header, model_card(base, headers, weights, "sum"), single_file, DTYPES[dtype])


def verify(merged: str | Path, base: str, adapters: list[str | Path], weights: list[float] | None = None,
           allow_pickle: bool = False) -> dict:
    """Recompute the merge and compare it with the shipped weights: the largest |difference| per tensor."""
    shipped = load_pipeline(str(merged), allow_pickle=allow_pickle)
    pipe = load_pipeline(base, allow_pickle=allow_pickle)
    apply_adapters(pipe, adapters, weights)
    diffs = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(pipe, component, None), getattr(shipped, component, None)
        if ours is None:
            continue
        a, b = ours.state_dict(), theirs.state_dict()
        if a.keys() != b.keys():
            extra = sorted(set(a) ^ set(b))[:3]
            raise AdapterError(f"{merged}: {component} tensors differ from the recomputed merge ({', '.join(extra)})")
        for key in a:
            diffs[f"{component}.{key}"] = (a[key].float() - b[key].float()).abs().max().item()
    worst = max(diffs, key=diffs.get)
    return {"merged": str(merged), "base": base, "adapters": [str(a) for a in adapters],
            "max_abs_diff": diffs[worst], "worst_tensor": worst, "tensors": diffs}
