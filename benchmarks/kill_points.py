"""SIGKILL at chosen moments of `esd-lora train` and `esd-lora merge`: what is left must be the old state
or the new one, the next run must clean up after the kill, and `--resume` must reach the adapter of an
uninterrupted run exactly.

    python benchmarks/kill_points.py [--fractions 0.3 0.5 ...]

Each run is a subprocess on a tiny random SD 1.x model built in code (as the tests build it), killed at a
fraction of the time an uninterrupted run of the same command takes (so the kills fall from start-up to
the last write); the report is printed and written to build/kill_points/report.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "kill_points"


def run(argv: list[str], kill_after: float | None = None) -> int | None:
    """Run `esd-lora argv`; with kill_after, SIGKILL it then (None if it had already finished)."""
    proc = subprocess.Popen([sys.executable, "-m", "esd_lora", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if kill_after is None:
        return proc.wait()
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def leftovers(folder: Path) -> list[str]:
    """Temporaries or renamed-aside copies of `folder` (or of files in it) beside or inside it."""
    beside = [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]
    inside = [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))] if folder.is_dir() else []
    return sorted(str(p.relative_to(WORK)) for p in beside + inside)


def train_case(model: Path, case: int, delay: float, reference: dict) -> dict:
    from safetensors.torch import load_file

    out = WORK / f"train_{case}"
    argv = ["train", str(WORK / "recipe.yaml"), f"model.id={model}", f"output.dir={out}", "--quiet"]
    rc = run(argv, delay)
    finished = rc == 0
    adapter = out / "pytorch_lora_weights.safetensors"
    state_after_kill = "new (finished)" if adapter.exists() else "old (no adapter yet)"
    readable = not adapter.exists() or bool(load_file(str(adapter)))
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if out.exists() else []
    if not finished:
        run([*argv, "--resume"] if checkpoints else [*argv, "--overwrite"])
    weights = load_file(str(adapter))
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    return {"delay_s": delay, "killed": rc is None, "exit_code": rc, "state_after_kill": state_after_kill,
            "adapter_readable_after_kill": readable, "checkpoints_at_kill": checkpoints,
            "resumed_equals_uninterrupted": all(bool((weights[k] == reference[k]).all()) for k in reference),
            "log_steps_valid": log == list(range(1, len(log) + 1)), "leftovers_after_next_run": leftovers(out)}


def merge_case(model: Path, adapter: Path, case: int, delay: float) -> dict:
    out = WORK / f"merged_{case}"
    single = WORK / f"merged_{case}.safetensors"
    argv = ["merge", str(adapter), "--base", str(model), "--out", str(out), "--single-file", str(single)]
    rc = run(argv, delay)
    finished = rc == 0
    folder_whole = (out / "model_index.json").exists() and (out / "README.md").exists()
    state = "new" if folder_whole else "old (nothing)" if not out.exists() else "PARTIAL"
    single_after_kill = single.exists()
    if not finished:
        run([*argv, "--overwrite"])
    verified = run(["verify", str(out), "--base", str(model), "--adapters", str(adapter)]) == 0
    return {"delay_s": delay, "killed": rc is None, "exit_code": rc, "folder_after_kill": state,
            "single_file_after_kill": single_after_kill, "verify_after_next_run": verified,
            "leftovers_after_next_run": leftovers(out)}


def main() -> None:
    import shutil

    import yaml
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    args = ap.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model = build_tiny_pipeline("sd1", WORK / "model")
    recipe = {"concept": {"prompts": ["a red shape"], "preserve": ["a blue shape"]},
              "train": {"steps": 40, "ddim_steps": 10, "refresh_every": 4, "batch": 2},
              "output": {"checkpoint_every": 5}}
    (WORK / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t0 = time.time()
    run(["train", str(WORK / "recipe.yaml"), f"model.id={model}", f"output.dir={WORK / 'reference'}", "--quiet"])
    train_seconds = time.time() - t0
    t0 = time.time()
    run(["merge", str(WORK / "reference"), "--base", str(model), "--out", str(WORK / "merged_reference"),
         "--single-file", str(WORK / "merged_reference.safetensors")])
    merge_seconds = time.time() - t0
    print(f"uninterrupted: train {train_seconds:.1f} s, merge {merge_seconds:.1f} s", flush=True)
    reference = load_file(str(WORK / "reference" / "pytorch_lora_weights.safetensors"))
    rows = {"train_seconds": train_seconds, "merge_seconds": merge_seconds, "train": [], "merge": []}
    for case, fraction in enumerate(args.fractions):
        rows["train"].append(train_case(model, case, round(fraction * train_seconds, 1), reference))
        print(json.dumps(rows["train"][-1]), flush=True)
    for case, fraction in enumerate(args.fractions):
        rows["merge"].append(merge_case(model, WORK / "reference", case, round(fraction * merge_seconds, 1)))
        print(json.dumps(rows["merge"][-1]), flush=True)
    (WORK / "report.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
