"""Merged, single-file and exported erasures make the same images as base + adapter, on the toy model.

    python benchmarks/merge_exactness.py [--adapter adapters/red] [--n 16]

Merges the adapter into the toy model (diffusers folder and single file), exports it as kohya and
diffusers LoRA files, loads each with the standard diffusers loader, and prints the largest pixel
difference against the toy model with the adapter loaded live (fp32, same seeds). Merging adds each
delta to the weight once instead of at every call, so the images may differ by float rounding.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from esd_lora.adapter import load_adapters
    from esd_lora.errors import ExportError
    from esd_lora.export import export_adapter
    from esd_lora.merge import merge, verify
    from esd_lora.models import load_pipeline, resolve
    from esd_lora.sample import generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="adapters/red")
    ap.add_argument("--prompt", default="a red star")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    seeds = list(range(args.n))

    def images(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return generate(pipe, [args.prompt] * args.n, seeds, progress=False)

    live = load_pipeline("toy")
    load_adapters(live, [args.adapter])
    reference = images(live)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = merge("toy", [args.adapter], tmp / "merged", single_file=tmp / "merged.safetensors")
        single = StableDiffusionPipeline.from_single_file(str(tmp / "merged.safetensors"), config=str(folder),
                                                          local_files_only=True, safety_checker=None,
                                                          dtype=torch.float32)
        rows = {"merged folder (from_pretrained)": load_pipeline(str(folder)), "single file (from_single_file)": single}
        not_exported = {}
        for fmt in ("kohya", "diffusers"):
            try:
                file = export_adapter(args.adapter, tmp / f"{fmt}.safetensors", fmt)
            except ExportError as e:  # retrained token rows: no LoRA file carries them
                not_exported[f"{fmt} LoRA"] = str(e)
                continue
            pipe = StableDiffusionPipeline.from_pretrained(resolve("toy"), safety_checker=None,
                                                           dtype=torch.float32)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
            rows[f"{fmt} LoRA (load_lora_weights)"] = pipe
        print(f"{args.n} images of {args.prompt!r}, fp32, against toy + {args.adapter} loaded live:")
        for name, pipe in rows.items():
            diff = (images(pipe) - reference).abs().max().item()
            print(f"  {name}: max |pixel difference| {diff / 2:.3g} on the pipeline's [0, 1] output scale "
                  f"({diff:.3g} on [-1, 1])")
        for name, why in not_exported.items():
            print(f"  {name}: not exported ({why})")
        check = verify(folder, "toy", [args.adapter])
        print(f"  verify: largest |weight difference| {check['max_abs_diff']:.3g} over {len(check['tensors'])} tensors")


if __name__ == "__main__":
    main()
