"""A table of bad inputs through every subcommand, in-process: each one must exit 2 with a single stderr
line that names the problem (the key, file or flag), print no traceback, and leave the folder unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esd_lora.adapter import WEIGHTS_NAME
from esd_lora.cli import main

GOOD_RECIPE = {"model": {"id": "MODEL"}, "concept": {"prompts": ["a red shape"]},
               "train": {"steps": 1, "ddim_steps": 2}, "output": {"dir": "OUT"}}


def _with_header(src: Path, dst: Path, **changes) -> Path:
    """A copy of an adapter file with header keys changed (None: removed)."""
    from esd_lora.provenance import read_metadata

    meta = read_metadata(src)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def _corrupt_files(ws: Path, adapter: Path) -> dict[str, Path]:
    """Files that are not what they claim to be, each named for what is wrong with it."""
    good = (adapter / WEIGHTS_NAME).read_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + header_len])
    key = next(k for k in header if k != "__metadata__")
    tampered = dict(header, **{key: dict(header[key], shape=[s * 3 for s in header[key]["shape"]])})
    tampered_bytes = json.dumps(tampered).encode()
    files = {
        "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "shape": struct.pack("<Q", len(tampered_bytes)) + tampered_bytes + good[8 + header_len:],
        "garbled": struct.pack("<Q", header_len) + b"{" * header_len + good[8 + header_len:],
        "huge": struct.pack("<Q", 2**62) + good[8:],
        "text": b"this is not a tensor file\n",
    }
    out = {}
    for name, data in files.items():
        out[name] = ws / "bad" / f"{name}.safetensors"
        out[name].write_bytes(data)
    out["folder"] = ws / "bad" / "folder.safetensors"
    out["folder"].mkdir()
    out["stripped"] = _with_header(adapter / WEIGHTS_NAME, ws / "bad" / "stripped.safetensors",
                                   **{"esd_lora.base_unet_sha256": None, "esd_lora.base_family": None})
    out["badjson"] = _with_header(adapter / WEIGHTS_NAME, ws / "bad" / "badjson.safetensors",
                                  **{"esd_lora.concepts": "[oops"})
    out["nan"] = ws / "bad" / "nan.safetensors"
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    from esd_lora.provenance import read_metadata

    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(out["nan"]),
              metadata=read_metadata(adapter / WEIGHTS_NAME))
    return out


def _recipes(ws: Path, model: Path) -> dict[str, Path]:
    """Recipe files with one thing wrong each."""
    def dump(data) -> str:
        return json.dumps(data).replace("MODEL", str(model)).replace("OUT", str(ws / "runs" / "x"))

    texts = {
        "duplicate_section": "model:\n  id: toy\ntrain:\n  steps: 2\ntrain:\n  steps: 3\nconcept:\n  prompts: [a]\n",
        "nested": "concept:\n  prompts: " + "[" * 3000 + "]" * 3000 + "\n",
        "binary": None,
        "list_top": "- a\n- b\n",
        "not_yaml": "concept: [unclosed\n",
        "dotdot_name": "name: ..\nconcept:\n  prompts: [a]\n",
        "hidden_name": "name: .x\nconcept:\n  prompts: [a]\n",
        "no_prompts": "concept:\n  prompts: []\n",
        "blank_prompt": "concept:\n  prompts: ['  ']\n",
        "wrong_type_section": "concept: 3\n",
        "unknown_section": "concept:\n  prompts: [a]\ntrian: {}\n",
        "no_match": dump({**GOOD_RECIPE, "adapter": {"targets": r".*attn9\..*"}}),
        "missing_model": dump({**GOOD_RECIPE, "model": {"id": str(ws / "no-model")}}),
        "mixed_halves": dump({**GOOD_RECIPE, "model": {"id": "MODEL", "dtype": "fp16"},
                              "train": {"mixed_precision": "bf16"}}),
        "unhashable_key": "concept:\n  ? [a, b]\n  : 1\n",
    }
    out = {}
    for name, text in texts.items():
        out[name] = ws / "recipes" / f"{name}.yaml"
        if text is None:
            out[name].write_bytes(b"\xff\xfe\x00garbage\x80")
        else:
            out[name].write_text(text)
    good = ws / "recipes" / "good.yaml"
    good.write_text(dump(GOOD_RECIPE))
    out["good"] = good
    return out


@pytest.fixture(scope="module")
def ws(tiny_models, tiny_adapters, tmp_path_factory) -> dict:
    """A workspace: a tiny model, adapters, corrupt files, recipes, a file and a folder already there."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for sub in ("bad", "recipes", "taken"):
        (root / sub).mkdir()
    adapter = root / "red"
    shutil.copytree(tiny_adapters["red"], adapter)
    (root / "taken" / "notes.txt").write_text("the user's")
    (root / "afile").write_text("a file, not a folder")
    (root / "runlike").mkdir()
    (root / "runlike" / "log.jsonl").write_text("{}\n")
    return {"root": root, "model": tiny_models["sd1"], "sdxl": tiny_models["sdxl"], "adapter": adapter,
            "sd2_adapter": tiny_adapters["sd2"],
            "files": _corrupt_files(root, adapter), "recipes": _recipes(root, tiny_models["sd1"])}


def _cases() -> list[tuple[str, list[str], str]]:
    """(case id, argv with placeholders, words the one error line must contain)."""
    cases = []
    # numbers on the command line: every numeric flag, out of range or not finite
    numeric = {
        "sample": [("--n", ["0", "-1", "nan", "1e12", "2.5", "x"]), ("--steps", ["0", "-1", "inf", "5000"]),
                   ("--guidance", ["nan", "inf", "-1", "1e9"]), ("--seed", ["-1", "nan"]), ("--scale", ["0", "99"])],
        "eval": [("--n", ["0", "nan"]), ("--steps", ["0", "-3"]), ("--guidance", ["nan", "-inf"]), ("--seed", ["-5"])],
        "merge": [("--weights", ["nan", "inf", "-inf", "x"])],
        "stack": [("--weights", ["nan", "inf"]), ("--n", ["0", "nan"])],
        "verify": [("--tolerance", ["nan", "-1", "inf", "x"]), ("--top", ["-1", "nan"])],
        "toy quality": [("--n", ["0"]), ("--steps", ["0"]), ("--guidance", ["nan"])],
        "toy build": [("--unet-steps", ["0", "nan"]), ("--seed", ["-1"])],
        "attack": [("--attack-steps", ["0", "nan", "2.5"]), ("--lr", ["0", "inf", "nan"]), ("--tokens", ["0", "99"]),
                   ("--batch", ["0"]), ("--measure-at", ["-1", "nan"]), ("--candidates", ["0"]), ("--n", ["0"]),
                   ("--repeats", ["0", "2.5"])],
    }
    base_argv = {"sample": ["sample", "a red shape", "--model", "{model}", "--out", "{root}/g.png"],
                 "eval": ["eval", "{model}", "--concepts", "red", "--out", "{root}/e"],
                 "merge": ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/m"],
                 "stack": ["stack", "{adapter}", "--base", "{model}", "--out", "{root}/s"],
                 "verify": ["verify", "{root}/m", "--base", "{model}"],
                 "toy quality": ["toy", "quality", "--model", "{model}"],
                 "toy build": ["toy", "build", "--work", "{root}/b"],
                 "attack": ["attack", "{model}", "--concept", "red", "--out", "{root}/a"]}
    for command, flags in numeric.items():
        for flag, values in flags:
            for value in values:
                cases.append((f"{command}{flag}={value}", [*base_argv[command], flag, value], flag))
    # corrupt or foreign adapter files, in every command that reads adapters
    readers = {
        "sample": ["sample", "x", "--model", "{model}", "--adapter", "{file}", "--out", "{root}/g.png"],
        "eval": ["eval", "{model}", "--clip", "{root}/no-clip", "--concepts", "red", "--kept", "blue", "--adapter",
                 "{file}", "--out", "{root}/e"],
        "merge": ["merge", "{file}", "--base", "{model}", "--out", "{root}/m"],
        "stack": ["stack", "{file}", "--base", "{model}", "--out", "{root}/s"],
        "verify": ["verify", "{model}", "--base", "{model}", "--adapters", "{file}"],
        "export-kohya": ["export", "{file}", "--format", "kohya", "--out", "{root}/k.safetensors"],
        "export-diffusers": ["export", "{file}", "--format", "diffusers", "--out", "{root}/d.safetensors"],
        "attack": ["attack", "{model}", "--adapter", "{file}", "--concept", "red", "--clip", "{root}/no-clip", "--kept",
                   "blue", "--out", "{root}/a"],
    }
    for command, argv in readers.items():
        for bad in ("png", "empty", "truncated", "shape", "garbled", "huge", "text", "folder", "stripped",
                    "badjson"):
            words = {"stripped": "no esd-lora provenance", "badjson": "esd_lora.concepts",
                     "folder": "folder.safetensors"}.get(bad, f"{bad}.safetensors")
            cases.append((f"{command}-{bad}", [a.replace("{file}", f"{{root}}/bad/{bad}.safetensors") for a in argv],
                          words))
    for command in ("sample", "merge", "stack"):
        argv = readers[command]
        cases.append((f"{command}-other-family", [a.replace("{file}", "{sd2_adapter}") for a in argv],
                      "trained for an sd2 model"))
        cases.append((f"{command}-missing", [a.replace("{file}", "{root}/nothing") for a in argv],
                      "no such file or folder"))
        cases.append((f"{command}-pickle", [a.replace("{file}", "{root}/afile") for a in argv],
                      "only .safetensors"))
    cases += [
        ("merge-nan-weights-adapter", ["merge", "{root}/bad/nan.safetensors", "--base", "{model}", "--out", "{root}/m"],
         "not finite"),
        ("merge-weight-count", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/m", "--weights", "1", "2"],
         "--weights"),
        ("stack-weight-count", ["stack", "{adapter}", "--base", "{model}", "--out", "{root}/s", "--weights", "1", "2"],
         "--weights"),
    ]
    # output paths: onto the user's files, onto an input, under a file, a file where a folder goes
    outputs = [
        ("merge-out-nonempty", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/taken"], "--overwrite"),
        ("merge-out-input", ["merge", "{adapter}", "--base", "{model}", "--out", "{adapter}"], "holds an input"),
        ("merge-out-input-overwrite", ["merge", "{adapter}", "--base", "{model}", "--out", "{adapter}",
                                       "--overwrite"], "holds an input"),
        ("merge-out-base", ["merge", "{adapter}", "--base", "{model}", "--out", "{model}", "--overwrite"],
         "holds an input"),
        ("merge-out-under-file", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/afile/m"],
         "a parent of it is a file"),
        ("merge-out-is-file", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/afile", "--overwrite"],
         "is a file"),
        ("merge-single-file-folder", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/m",
                                      "--single-file", "{root}/taken"], "is a folder"),
        ("merge-single-file-taken", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/m",
                                     "--single-file", "{root}/taken/notes.txt"], "--overwrite"),
        ("stack-out-nonempty", ["stack", "{adapter}", "--base", "{model}", "--out", "{root}/taken"], "--overwrite"),
        ("stack-out-input", ["stack", "{adapter}", "--base", "{model}", "--out", "{adapter}", "--overwrite"],
         "holds an input"),
        ("stack-out-under-file", ["stack", "{adapter}", "--base", "{model}", "--out", "{root}/afile/s"],
         "a parent of it is a file"),
        ("export-out-taken", ["export", "{adapter}", "--out", "{root}/taken/notes.txt"], "--overwrite"),
        ("export-out-self", ["export", "{adapter}/" + WEIGHTS_NAME, "--out", "{adapter}/" + WEIGHTS_NAME,
                             "--overwrite"], "holds an input"),
        ("export-out-folder", ["export", "{adapter}", "--out", "{root}/taken", "--overwrite"], "is a folder"),
        ("export-out-under-file", ["export", "{adapter}", "--out", "{root}/afile/x.safetensors"],
         "a parent of it is a file"),
        ("export-out-suffix", ["export", "{adapter}", "--out", "{root}/x.bin"], ".safetensors"),
        ("sample-out-folder", ["sample", "x", "--model", "{model}", "--out", "{root}/taken"], "is a folder"),
        ("sample-out-under-file", ["sample", "x", "--model", "{model}", "--out", "{root}/afile/g.png"],
         "a parent of it is a file"),
        ("eval-out-file", ["eval", "{model}", "--clip", "{root}/c", "--concepts", "a", "--kept", "b", "--out",
                           "{root}/afile"], "is a file"),
        ("verify-json-folder", ["verify", "{model}", "--base", "{model}", "--json", "{root}/taken"], "is a folder"),
        ("train-out-under-file", ["train", "{recipes}/good.yaml", "output.dir={root}/afile/run"], "output.dir"),
        ("train-out-is-file", ["train", "{recipes}/good.yaml", "output.dir={root}/afile"], "output.dir"),
        ("train-out-finished", ["train", "{recipes}/good.yaml", "output.dir={adapter}"], "already holds an adapter"),
        ("train-out-run-files", ["train", "{recipes}/good.yaml", "output.dir={root}/runlike"], "log.jsonl"),
        ("train-out-model", ["train", "{recipes}/good.yaml", "output.dir={model}"], "holds the base model"),
        ("train-rows-only-preserve", ["train", "{recipes}/good.yaml", "adapter.concept_tokens=true", "train.lr=0",
                                      "train.token_lr=1e-3", "concept.preserve=[a blue shape]"], "concept.preserve"),
        ("merge-single-file-inside-out", ["merge", "{adapter}", "--base", "{model}", "--out", "{root}/m",
                                          "--single-file", "{root}/m/x.safetensors"], "inside --out"),
        ("sample-out-dir-file", ["sample", "x", "--model", "{model}", "--out", "{root}/g.png", "--out-dir",
                                 "{root}/afile"], "is a file"),
        ("stack-fuse-weights", ["stack", "{adapter}", "--strategy", "fuse", "--base", "{model}", "--out", "{root}/s",
                                "--weights", "1"], "--weights"),
        ("stack-out-recipes", ["stack", "{recipes}/good.yaml", "--strategy", "sequential", "--base", "{model}",
                               "--out", "{recipes}", "--overwrite"], "holds an input"),
        ("verify-other-family", ["verify", "{model}", "--base", "{sdxl}"], "differ from the recomputed merge"),
    ]
    cases += outputs
    # recipes and overrides
    recipe_cases = {
        "duplicate_section": "train: given twice", "nested": "nested too deeply", "binary": "not a text file",
        "list_top": "top level", "not_yaml": "not valid YAML", "dotdot_name": "name", "hidden_name": "name",
        "no_prompts": "concept.prompts", "blank_prompt": "concept.prompts", "wrong_type_section": "concept",
        "unknown_section": "trian", "no_match": "adapter.targets", "missing_model": "cannot load model",
        "mixed_halves": "train.mixed_precision", "unhashable_key": "a key must be a plain value",
    }
    for name, words in recipe_cases.items():
        cases.append((f"train-recipe-{name}", ["train", f"{{recipes}}/{name}.yaml"], words))
    overrides = {
        "concept.eta=.inf": "concept.eta", "concept.eta=.nan": "concept.eta", "concept.eta=0": "concept.eta",
        "concept.eta=1e9": "concept.eta", "train.lr=.inf": "train.lr", "train.lr=1e6": "train.lr",
        "train.lr=-1": "train.lr", "train.lr=.nan": "train.lr", "train.guidance=.nan": "train.guidance",
        "train.guidance=0.5": "train.guidance", "adapter.alpha=.inf": "adapter.alpha",
        "adapter.alpha=0": "adapter.alpha", "adapter.rank=1e12": "adapter.rank", "adapter.rank=0": "adapter.rank",
        "train.batch=1e12": "train.batch", "train.batch=0": "train.batch", "train.steps=0": "train.steps",
        "train.steps=.inf": "train.steps", "train.steps=2.5": "train.steps", "train.seed=-1": "train.seed",
        "train.warmup_steps=5": "train.warmup_steps", "train.ddim_steps=0": "train.ddim_steps",
        "train.refresh_every=0": "train.refresh_every", "adapter.dropout=1": "adapter.dropout",
        "concept.preserve_weight=-1": "concept.preserve_weight", "concept.preserve_weight=.nan":
        "concept.preserve_weight", "train.optimizer=lion": "train.optimizer", "model.dtype=int8": "model.dtype",
        "output.checkpoint_every=-1": "output.checkpoint_every", "name=..": "name", "name=a/b": "name",
        "concept.erase_from=[a,b,c]": "concept.erase_from", "a.b.c=1": "a.b.c", "train.steps": "train.steps",
        "train.gradient_checkpointing=maybe": "train.gradient_checkpointing", "trian.steps=1": "trian",
        "attack.methods=[gcg]": "attack.methods", "attack.methods=[ti, ti]": "attack.methods",
        "attack.restart_every=-1": "attack.restart_every", "attack.tokens=0": "attack.tokens", "attack.lr=.inf": "attack.lr",
        "attack.every=0": "attack.every", "attack.steps=0": "attack.steps", "attack.images=0": "attack.images",
        "attack.weight=.nan": "attack.weight", "attack.eta=-1": "attack.eta", "attack.templates=[no-slot]": "attack.templates",
        "attack.batch=0": "attack.batch", "adapter.text_encoder=(": "adapter.text_encoder",
        "adapter.text_encoder=conv_in": "adapter.text_encoder", "adapter.text_encoder=[nowhere]": "adapter.text_encoder",
        "adapter.concept_tokens=maybe": "adapter.concept_tokens", "train.token_lr=0": "train.token_lr",
        "train.token_lr=1e-4": "train.token_lr", "train.lr=0": "train.lr", "attack.pool=-1": "attack.pool",
        "attack.new_words=true": "attack.new_words",
    }
    for override, words in overrides.items():
        cases.append((f"train-override-{override}", ["train", "{recipes}/good.yaml", override], words))
    cases += [
        ("train-no-recipe", ["train", "{root}/none.yaml"], "no such file"),
        ("train-recipe-folder", ["train", "{root}/taken"], "no such file"),
        ("eval-no-scorer", ["eval", "{model}", "--concepts", "red", "--out", "{root}/e"], "--clip"),
        ("eval-unknown-concept", ["eval", "toy", "--concepts", "magenta", "--out", "{root}/e"], "magenta"),
        ("eval-prompts-missing", ["eval", "toy", "--concepts", "red", "--prompts", "{root}/none.txt", "--out",
                                  "{root}/e"], "--prompts"),
        ("eval-prompts-binary", ["eval", "toy", "--concepts", "red", "--prompts", "{recipes}/binary.yaml", "--out",
                                 "{root}/e"], "--prompts"),
        ("eval-clip-one-label", ["eval", "{model}", "--clip", "{root}/c", "--concepts", "red", "--out", "{root}/e"],
         "--kept"),
        ("eval-missing-model", ["eval", "{root}/no-model", "--clip", "{root}/c", "--concepts", "a", "--kept", "b",
                                "--out", "{root}/e"], "cannot load"),
        ("sample-missing-model", ["sample", "x", "--model", "{root}/no-model", "--out", "{root}/g.png"],
         "cannot load model"),
        ("sample-not-pipeline", ["sample", "x", "--model", "{root}/taken", "--out", "{root}/g.png"],
         "not a diffusers pipeline"),
        ("sample-pickle-model", ["sample", "x", "--model", "{root}/m.ckpt", "--out", "{root}/g.png"],
         "pickle"),
        ("merge-pickle-base", ["merge", "{adapter}", "--base", "{root}/bad/model.ckpt", "--out", "{root}/m"],
         "pickle"),
        ("verify-not-merged", ["verify", "{root}/taken", "--base", "{model}"], "not a diffusers pipeline"),
        ("stack-no-strategy", ["stack", "{adapter}", "--strategy", "magic", "--out", "{root}/s"], "--strategy"),
        ("stack-clip-no-concepts", ["stack", "{adapter}", "--base", "{model}", "--out", "{root}/s", "--report",
                                    "--clip", "{root}/c"], "--concepts"),
        ("stack-recipe-bad", ["stack", "{recipes}/no_prompts.yaml", "--strategy", "sequential", "--base", "{model}",
                              "--out", "{root}/s"], "concept.prompts"),
        ("stack-preserve-missing", ["stack", "{adapter}", "--strategy", "fuse", "--base", "{model}", "--out",
                                    "{root}/s", "--preserve", "{root}/none.txt"], "--preserve"),
        ("train-text-encoder-classic", ["train", "{recipes}/good.yaml", "adapter=none", "adapter.text_encoder=attn"],
         "adapter.text_encoder"),
        ("train-text-encoder-sdxl", ["train", "{recipes}/good.yaml", "model.id={sdxl}", "adapter.text_encoder=attn"],
         "adapter.text_encoder"),
        ("train-concept-tokens-sdxl", ["train", "{recipes}/good.yaml", "model.id={sdxl}", "adapter.concept_tokens=true"],
         "adapter.concept_tokens"),
        ("train-concept-tokens-no-own-word", ["train", "{recipes}/good.yaml", "adapter.concept_tokens=true",
                                              "concept.erase_from=[a red shape]"], "adapter.concept_tokens"),
        ("train-concept-tokens-and-text-encoder", ["train", "{recipes}/good.yaml", "adapter.concept_tokens=true",
                                                   "adapter.text_encoder=attn"], "adapter.concept_tokens"),
        ("train-attack-init-unknown", ["train", "{recipes}/good.yaml", "attack.methods=[ti]", "attack.init=zzz",
                                       "attack.images=1"], "attack.init"),
        ("attack-no-scorer", ["attack", "{model}", "--concept", "red", "--out", "{root}/a"], "--clip"),
        ("attack-unknown-concept", ["attack", "toy", "--concept", "magenta", "--out", "{root}/a"], "magenta"),
        ("attack-unknown-method", ["attack", "toy", "--concept", "red", "--method", "gcg", "--out", "{root}/a"],
         "--method"),
        ("attack-measure-beyond-steps", ["attack", "toy", "--concept", "red", "--attack-steps", "4", "--measure-at",
                                         "8", "--out", "{root}/a"], "--measure-at"),
        ("attack-out-nonempty", ["attack", "toy", "--concept", "red", "--out", "{root}/taken"], "--overwrite"),
        ("attack-out-input", ["attack", "toy", "--adapter", "{adapter}", "--concept", "red", "--out", "{adapter}",
                              "--overwrite"], "holds an input"),
        ("attack-prompts-missing", ["attack", "toy", "--concept", "red", "--prompts", "{root}/none.txt", "--out",
                                    "{root}/a"], "--prompts"),
        ("attack-images-missing", ["attack", "toy", "--concept", "red", "--method", "ti", "--images",
                                   "{root}/no-images", "--attack-steps", "1", "--n", "1", "--out", "{root}/a"],
         "--images"),
        ("unknown-command", ["erase", "x"], "invalid choice"),
        ("unknown-flag", ["sample", "x", "--colour", "red"], "unrecognized arguments"),
        ("export-format", ["export", "{adapter}", "--format", "onnx", "--out", "{root}/x.safetensors"], "--format"),
        ("merge-dtype", ["merge", "{adapter}", "--out", "{root}/m", "--dtype", "fp8"], "--dtype"),
    ]
    return cases


CASES = _cases()


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_the_table_covers_every_subcommand_with_at_least_160_cases():
    commands = {argv[0] if argv[0] != "toy" else f"toy {argv[1]}" for _, argv, _ in CASES}
    assert {"train", "sample", "eval", "attack", "merge", "stack", "verify", "export", "toy quality",
            "toy build"} <= commands
    assert len(CASES) >= 160 and len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c for c, _, _ in CASES])
def test_bad_input_is_one_line_naming_the_problem_and_changes_nothing(case, argv, words, ws, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill = {"root": ws["root"], "model": ws["model"], "sdxl": ws["sdxl"], "adapter": ws["adapter"],
            "sd2_adapter": ws["sd2_adapter"], "recipes": ws["root"] / "recipes"}
    argv = [a.format(**fill) for a in argv]
    before = _snapshot(ws["root"])
    capsys.readouterr()
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esd-lora: error:"), err
    assert words in err[0], err[0]
    assert _snapshot(ws["root"]) == before, case
