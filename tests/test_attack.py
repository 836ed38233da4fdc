import json

import pytest
import torch
from safetensors.torch import load_file

from esd_lora.adapter import load_adapters
from esd_lora.attack import AttackSettings, attack, format_report
from esd_lora.cli import main
from esd_lora.errors import EsdLoraError
from esd_lora.models import load_pipeline
from esd_lora.sample import generate


class RednessScorer:
    """A stand-in scorer for tiny random models: an image shows "red" when its red channel is its brightest."""

    name = "redness"
    words = ("red", "blue")

    def concepts(self, prompt):
        return [w for w in self.words if w in prompt.split()]

    def default_prompts(self, erased):
        return [f"a {w} shape" for w in self.words]

    def held_out_prompts(self, erased, trained, n, seed):
        return [f"{t} {w} {s}" for t in ("a", "one") for w in self.words for s in ("star", "circle", "ring")][:n]

    def attack_templates(self, concept):
        return ["a {} star", "a {} circle"]

    def __call__(self, images, prompt):
        red = (images[:, 0].mean((1, 2)) > images[:, 1:].mean((1, 2, 3))).float().mean()
        return {c: float(red) if c == "red" else float(1 - red) for c in self.concepts(prompt)}


def settings(**kw):
    base = dict(concept="red", steps=4, measure_at=[0, 2], batch=2, target_images=4, candidates=12, screen=1, keep=2,
                n=2, sampling_steps=2)
    return AttackSettings(**{**base, **kw})


def without_times(report):
    for result in report["attacks"].values():
        result.pop("seconds")
        for point in [*result.get("curve", []), *result.get("by_seed", [])]:
            point.pop("seconds")
    return report


def test_every_attack_reports_its_rate_against_compute_and_the_base_under_the_same_attack(tiny_models, tiny_adapters):
    report, grid, tokens = attack(str(tiny_models["sd1"]), [str(tiny_adapters["red"])], RednessScorer(), settings(),
                                  progress=False)
    assert list(report["attacks"]) == ["prompts", "ti", "soft-prompt"]
    prompts = report["attacks"]["prompts"]
    assert prompts["tried"] == 6  # the candidates that name red
    assert len(prompts["worst"]) == 2 and all("red" in w["prompt"] for w in prompts["worst"])
    assert prompts["rate"] == max(w["erased"] for w in prompts["worst"])
    for method in ("ti", "soft-prompt"):
        r = report["attacks"][method]
        assert [c["step"] for c in r["curve"]] == [0, 2, 4] and r["rate"] == r["curve"][-1]["rate"]
        assert 0 <= r["base_rate"] <= 1 and len(r["per_prompt"]) == 2
        assert list(tokens[method]) == [f"<esd-{method}>"] and tokens[method][f"<esd-{method}>"].shape == (1, 16)
    assert report["attacks"]["ti"]["prompts"] == ["a <esd-ti> star", "a <esd-ti> circle"]
    assert report["attacks"]["soft-prompt"]["prompts"] == ["<esd-soft-prompt> a red star",
                                                           "<esd-soft-prompt> a red circle"]
    assert grid.width > 0 and "| ti | 4 steps" in format_report(report)
    again, _, _ = attack(str(tiny_models["sd1"]), [str(tiny_adapters["red"])], RednessScorer(), settings(),
                         progress=False)
    assert without_times(again) == without_times(report)  # seeded: the same audit twice


class CornerScorer(RednessScorer):
    """Reads red from one pixel, so that on the tiny model the rate moves with the seed."""

    def __call__(self, images, prompt):
        red = (images[:, 0, 0, 0] > images[:, 1, 0, 0]).float().mean()
        return {c: float(red) if c == "red" else float(1 - red) for c in self.concepts(prompt)}


def test_repeats_run_each_attack_at_several_seeds_as_each_seed_alone(tiny_models, tiny_adapters):
    model, adapters, seeds = str(tiny_models["sd1"]), [str(tiny_adapters["red"])], (3, 4, 5)
    alone = [attack(model, adapters, CornerScorer(), settings(seed=seed), progress=False) for seed in seeds]
    report, _, tokens = attack(model, adapters, CornerScorer(), settings(seed=3, repeats=3), progress=False)
    alone_results = [without_times(a[0])["attacks"] for a in alone]
    for method, result in without_times(report)["attacks"].items():
        runs = [a[method] for a in alone_results]
        assert [(b["seed"], b["rate"], b["base_rate"]) for b in result["by_seed"]] == \
            [(seed, r["rate"], r["base_rate"]) for seed, r in zip(seeds, runs)]
        assert len({r["rate"] for r in runs}) > 1  # the seeds differ, so the one kept is not the first by default
        best = max(range(3), key=lambda i: runs[i]["rate"])
        assert result["seed"] == seeds[best] and result["mean_rate"] == pytest.approx(sum(r["rate"] for r in runs) / 3)
        own = {k: v for k, v in runs[best].items() if k not in ("seed", "by_seed", "mean_rate")}
        assert {k: v for k, v in result.items() if k in own} == own  # the best seed's own figures
        if method != "prompts":
            assert all(torch.equal(tokens[method][k], alone[best][2][method][k]) for k in tokens[method])


def test_repeats_keep_the_first_seed_of_the_highest_rate_and_count_every_seed_s_compute(tiny_models, monkeypatch):
    from esd_lora import attack as audit_module

    rates = {3: 0.25, 4: 0.75, 5: 0.75}

    def learned(self, method, renders):  # each seed's attack, as the audit would report it
        seed, rate = self.s.seed, rates[self.s.seed]
        result = {"rate": rate, "base_rate": 1.0, "steps": 4, "seconds": 1.0,
                  "curve": [{"step": 4, "seconds": 1.0, "rate": rate}]}
        return result, torch.full((2, 1, 3, 4, 4), float(seed)), {"seed": seed}

    monkeypatch.setattr(audit_module.Audit, "learned", learned)
    report, _, tokens = attack(str(tiny_models["sd1"]), [], RednessScorer(),
                               settings(methods=["ti"], seed=3, repeats=3), progress=False)
    result = report["attacks"]["ti"]
    assert result["seed"] == 4 and result["rate"] == 0.75 and result["mean_rate"] == pytest.approx(7 / 12)
    assert [b["rate"] for b in result["by_seed"]] == [0.25, 0.75, 0.75] and tokens["ti"] == {"seed": 4}
    assert "| ti | 4 steps, 1 s (all 3 seeds: 3 s) | 75% (seed 4, the highest of 3 seeds; mean 58%) |" in \
        format_report(report)


def test_learned_tokens_load_in_diffusers_and_draw_what_the_attack_measured(tiny_models, tiny_adapters, tmp_path):
    from safetensors.torch import save_file

    model, adapter = str(tiny_models["sd1"]), str(tiny_adapters["red"])
    _, _, tokens = attack(model, [adapter], RednessScorer(), settings(methods=["ti"], tokens=2), progress=False)
    save_file(tokens["ti"], str(tmp_path / "ti.safetensors"))
    pipe = load_pipeline(model)
    load_adapters(pipe, [adapter])
    pipe.load_textual_inversion(str(tmp_path / "ti.safetensors"))
    loaded = generate(pipe, ["a <esd-ti> star"], [0], steps=2, progress=False)
    from esd_lora.adversary import LearnedTokens

    pipe = load_pipeline(model)
    load_adapters(pipe, [adapter])
    learned = LearnedTokens(pipe, tokens["ti"]["<esd-ti>"], group="ti")
    assert learned.names == ["<esd-ti>", "<esd-ti>_1"]
    assert torch.allclose(generate(pipe, [f"a {learned.text} star"], [0], steps=2, progress=False), loaded, atol=1e-5)


@pytest.mark.parametrize("name", ["red", "red_tokens"])
def test_an_attack_on_the_merged_model_gives_the_rate_of_the_attack_on_the_live_adapter(name, tiny_models,
                                                                                          tiny_adapters, tmp_path):
    from esd_lora.merge import merge

    model, adapter = str(tiny_models["sd1"]), str(tiny_adapters[name])
    merged = merge(model, [adapter], tmp_path / "merged")
    live, _, _ = attack(model, [adapter], RednessScorer(), settings(methods=["ti", "soft-prompt"]), progress=False)
    folded, _, _ = attack(model, [], RednessScorer(), settings(methods=["ti", "soft-prompt"]),
                          erased_model=str(merged), progress=False)
    assert folded["erased_model"] == str(merged)
    assert without_times(folded)["attacks"] == without_times(live)["attacks"]
    # the base under the same attack is the base, with every adapter off (the text encoder's retrained rows too)
    base, _, _ = attack(model, [], RednessScorer(), settings(methods=["ti", "soft-prompt"]), progress=False)
    assert [live["attacks"][m]["base_rate"] for m in ("ti", "soft-prompt")] == \
        [base["attacks"][m]["rate"] for m in ("ti", "soft-prompt")]


def test_attack_refuses_what_it_cannot_measure(tiny_models, tiny_adapters):
    with pytest.raises(EsdLoraError, match="cannot detect"):
        attack(str(tiny_models["sd1"]), [], RednessScorer(), settings(concept="green"), progress=False)
    with pytest.raises(EsdLoraError, match="SDXL"):
        attack(str(tiny_models["sdxl"]), [], RednessScorer(), settings(methods=["ti"]), progress=False)


def test_attack_command_on_the_toy_writes_the_report_the_grid_and_the_tokens(tmp_path, capsys):
    out = tmp_path / "audit"
    args = ["attack", "toy", "--adapter", "adapters/red", "--concept", "red", "--method", "ti", "prompts",
            "--attack-steps", "2", "--measure-at", "1", "2", "--n", "1", "--candidates", "3", "--steps", "2",
            "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.json", "report.md", "tokens_ti.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert report["attacks"]["prompts"]["tried"] == 3 and report["settings"]["scorer"] == "toy-classifier"
    assert list(load_file(str(out / "tokens_ti.safetensors"))) == ["<esd-ti>"]
    assert "# Attack report" in capsys.readouterr().out
    assert main(args) == 2  # not over the first audit without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args[:-2], "--measure-at", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--measure-at" in capsys.readouterr().err and not (tmp_path / "x").exists()
