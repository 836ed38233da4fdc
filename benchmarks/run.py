"""Every benchmark of esd-lora against classic ESD, in one run, into benchmarks/RESULTS.md.

    python benchmarks/run.py [--concepts red star striped]

1. time to erasure on the toy model (`time_to_erasure.py`: esd-lora's fast default, esd-lora with the
   paper's sampling, classic ESD; a colour, a shape and a texture);
2. memory and step time of one training step on the full-size SD 1.5 UNet, fp32 and bf16 (`sd15_step.py`);
3. the share of step time spent producing x_t (from 2).

Each script also runs alone and writes its own table; this one runs both and puts the machine, the
versions, the headline ratios and both tables into RESULTS.md. Results already in
build/time_to_erasure/results.json and build/sd15_step/results.json are reused (delete them to redo).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"


def headline(tte: dict[str, dict], sd15: list[dict]) -> list[str]:
    """The ratios the README quotes."""
    lines = ["| measurement | esd-lora / classic ESD |", "|---|---|"]
    for concept in dict.fromkeys(r["concept"] for r in tte.values()):
        fast, paper, classic = (tte.get(f"{concept}/{m}") for m in ("esd-lora", "esd-lora-paper", "classic"))
        if fast and classic and fast["reached"]:
            bound = "" if classic["reached"] else "< "
            lines.append(f"| time to erase `{concept}` on the toy model (fast default) | "
                         f"{bound}{fast['train_seconds'] / classic['train_seconds']:.3f} |")
        if fast and paper and fast["reached"]:
            bound = "" if paper["reached"] else "< "
            lines.append(f"| time to erase `{concept}`, fast default / esd-lora with the paper's sampling | "
                         f"{bound}{fast['train_seconds'] / paper['train_seconds']:.3f} |")
        if fast and classic:
            lines.append(f"| peak memory erasing `{concept}` on the toy model | "
                         f"{fast['peak_memory_mb'] / classic['peak_memory_mb']:.2f} |")
    for precision in ("fp32", "bf16"):
        lora, classic = (next(r for r in sd15 if r["mode"] == m and r["precision"] == precision)
                         for m in ("esd-lora", "classic"))
        lines.append(f"| SD 1.5 UNet, {precision}: peak memory of a training step | "
                     f"{lora['peak_rss_mb'] / classic['peak_rss_mb']:.2f} |")
        lines.append(f"| SD 1.5 UNet, {precision}: step time, fast default / classic | "
                     f"{lora['fast_step_seconds'] / classic['step_seconds']:.2f} |")
    return lines


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_results(command: str) -> str:
    """RESULTS.md from the two benchmarks' saved results and tables."""
    import torch

    from esd_lora.io import atomic_write_text
    from esd_lora.provenance import package_versions

    tte = json.loads((ROOT / "build" / "time_to_erasure" / "results.json").read_text())
    sd15 = json.loads((ROOT / "build" / "sd15_step" / "results.json").read_text())
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    text = "\n".join([
        "# Benchmarks: esd-lora against classic ESD", "",
        f"`{command}` on {platform.machine()} ({cpu_name()}), {torch.get_num_threads()} threads, no GPU; "
        f"{versions}.", "",
        "## Headline ratios", "", *headline(tte, sd15), "",
        "Below 1 means esd-lora needs less. `<` marks a bound: the method compared with had not reached the "
        "target when its step limit or time budget ended the run.", "",
        (HERE / "TIME_TO_ERASURE.md").read_text().replace("# ", "## ", 1),
        (HERE / "SD15_RESULTS.md").read_text().replace("# ", "## ", 1),
    ])
    atomic_write_text(HERE / "RESULTS.md", text)
    return text


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", nargs="+", default=["red", "star", "striped"], help="toy recipes to erase")
    args = ap.parse_args()
    subprocess.run([sys.executable, str(HERE / "time_to_erasure.py"), "--concepts", *args.concepts], check=True)
    if not (ROOT / "build" / "sd15_step" / "results.json").exists():
        subprocess.run([sys.executable, str(HERE / "sd15_step.py")], check=True)
    print(write_results(" ".join(["python benchmarks/run.py", *sys.argv[1:]])))


if __name__ == "__main__":
    main()
