import pytest

from esd_lora.cli import main
from esd_lora.errors import EsdLoraError
from esd_lora.evaluate import ClipScorer, evaluate, rates_with_roles, summarize
from esd_lora.models import ModelLoadError
from esd_lora.toy.scoring import ToyScorer
from esd_lora.toy.vocab import named_concepts

REPORT_FIELDS = {"model", "erased_model", "adapters", "erased", "erased_from", "settings", "prompts", "sets", "summary",
                 "summary_trained", "summary_held_out"}


class _Words:
    """A scorer that reads concepts as the words of a prompt (enough for summaries)."""

    name = "words"

    def concepts(self, prompt):
        return named_concepts(prompt)


def test_named_concepts_reads_names_and_synonyms():
    assert named_concepts("a crimson striped star") == ["red", "striped", "star"]
    assert named_concepts("a photo of nothing") == []


def test_summary_separates_erased_from_kept():
    before = {"a red shape": {"red": 1.0}, "a blue shape": {"blue": 0.8}}
    after = {"a red shape": {"red": 0.1}, "a blue shape": {"blue": 0.6}}
    s = summarize(rates_with_roles(before, after, ["red"], _Words()))
    assert s["efficacy_max_detection"] == 0.1 and s["specificity_min_ratio"] == pytest.approx(0.75)


def test_erase_from_counts_the_concept_as_erased_on_its_subject_only():
    before = {"a red circle": {"red": 1.0, "circle": 1.0}, "a scarlet disk": {"red": 1.0, "circle": 1.0},
              "a red square": {"red": 1.0, "square": 1.0}}
    after = {"a red circle": {"red": 0.05, "circle": 1.0}, "a scarlet disk": {"red": 0.1, "circle": 0.9},
             "a red square": {"red": 0.5, "square": 1.0}}
    rates = rates_with_roles(before, after, ["red"], _Words(), erased_from=["circle"])
    assert rates["a scarlet disk"]["red"]["role"] == "erased" and rates["a red square"]["red"]["role"] == "kept"
    s = summarize(rates)
    assert s["efficacy_max_detection"] == 0.1 and s["specificity_min_ratio"] == 0.5


def test_toy_report_of_a_model_against_itself_keeps_every_concept(tmp_path):
    report, grid = evaluate("toy", [], ["red"], ToyScorer(), prompts=["a red shape", "a blue shape"], n=2, steps=4,
                            progress=False, erased_model="toy")
    assert set(report) == REPORT_FIELDS
    assert report["settings"]["scheduler"] == "DDIMScheduler"  # what drew the images, not a fixed name
    assert report["prompts"]["a blue shape"]["blue"]["base"] == report["prompts"]["a blue shape"]["blue"]["erased"]
    assert report["summary"]["efficacy_max_detection"] == report["prompts"]["a red shape"]["red"]["base"]
    assert grid.size[0] > grid.size[1]


def test_clip_scoring_on_a_tiny_pipeline_with_an_adapter(tiny_models, tiny_adapters, tiny_clip, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", str(tiny_models["sd1"]), "--adapter", str(tiny_adapters["red"]), "--concepts", "red",
                 "--kept", "blue", "green", "--clip", str(tiny_clip), "--n", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_FIELDS and report["settings"]["scorer"] == f"clip:{tiny_clip}"
    assert list(report["prompts"]) == ["red", "blue", "green"]
    for prompt, rates in report["prompts"].items():
        assert list(rates) == [prompt] and all(0 <= rates[prompt][k] <= 1 for k in ("base", "erased"))
        assert rates[prompt]["role"] == ("erased" if prompt == "red" else "kept")
    assert (out / "report.md").is_file() and (out / "grid.png").is_file()


def test_clip_needs_alternatives_and_a_loadable_model(tiny_models, tiny_clip, tmp_path):
    with pytest.raises(EsdLoraError, match="alternatives"):
        ClipScorer(str(tiny_clip), ["red"])
    with pytest.raises(ModelLoadError, match="cannot load CLIP model"):
        ClipScorer(str(tmp_path / "no-clip"), ["red", "blue"])


def test_a_missing_adapter_fails_before_any_image(tmp_path, capsys, monkeypatch):
    import esd_lora.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "detection_rates", lambda *a, **k: pytest.fail("generated images"))
    assert main(["eval", "toy", "--adapter", str(tmp_path / "none"), "--concepts", "red",
                 "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_real_model_is_scored_with_clip_or_refused_in_one_line(tiny_models, tiny_clip, tmp_path, capsys):
    assert main(["eval", str(tiny_models["sd1"]), "--concepts", "red", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scorer of its own" in err[0] and "--clip" in err[0]
    assert not (tmp_path / "r").exists()


def test_stack_report_on_a_real_model_with_clip(tiny_models, tiny_adapters, tiny_clip, tmp_path):
    import json

    out = tmp_path / "stacked"
    assert main(["stack", str(tiny_adapters["red"]), str(tiny_adapters["star"]), "--base", str(tiny_models["sd1"]),
                 "--out", str(out), "--report", "--clip", str(tiny_clip), "--concepts", "red", "star", "--kept",
                 "blue", "--n", "2"]) == 0
    report = json.loads((tmp_path / "stacked-report" / "report.json").read_text())
    assert report["erased_model"] == str(out) and report["settings"]["scorer"] == f"clip:{tiny_clip}"
    assert {r["role"] for rates in report["prompts"].values() for r in rates.values()} == {"erased", "kept"}


def test_held_out_prompts_are_reported_apart_from_the_trained_ones(tiny_models, tmp_path):
    from conftest import make_adapter

    adapter = make_adapter(tiny_models["sd1"], tmp_path / "a", ["a red shape", "red"])
    held_out = ToyScorer.__new__(ToyScorer).held_out_prompts(["red"], ["a red shape", "red"], 6, seed=3)
    assert len(held_out) == 6 + 7 and not {"a red shape", "red"} & set(held_out)
    assert all(named_concepts(p)[:1] != [] for p in held_out)
    assert held_out == ToyScorer.__new__(ToyScorer).held_out_prompts(["red"], ["a red shape"], 6, seed=3)  # seeded

    class Words(_Words):
        def default_prompts(self, erased):
            return ["a red shape", "a crimson shape"]

        def held_out_prompts(self, erased, trained, n, seed):
            return ["one single scarlet star"][:n]

        def __call__(self, images, prompt):
            return {c: 1.0 for c in self.concepts(prompt)}

    report, _ = evaluate(str(tiny_models["sd1"]), [str(adapter)], ["red"], Words(), n=1, steps=1, progress=False)
    assert report["sets"] == {"trained": ["a red shape"], "held_out": ["a crimson shape", "one single scarlet star"]}
    assert report["summary_held_out"]["efficacy_max_detection"] == 1.0
    assert report["summary_trained"]["specificity_min_ratio"] is None


@pytest.mark.parametrize("concept, template, caption", [("red", "a {} circle", "a {} "), ("star", "a red {}", " {}"),
                                                        ("striped", "a {} circle", "a {} ")])
def test_toy_attack_templates_and_renders_say_the_concept_where_the_tokens_go(concept, template, caption):
    from esd_lora.toy.scoring import concept_renders

    scorer = ToyScorer()
    templates = scorer.attack_templates(concept)
    assert len(templates) == 8 and template in templates
    assert all(scorer.concepts(t.format(concept))[0 if concept != "star" else 1] == concept for t in templates)
    images, captions = concept_renders(concept, 16, seed=3)
    assert images.shape == (16, 3, 32, 32) and len(captions) == 16
    assert all(caption in c and c.count("{}") == 1 for c in captions)
    # the classifier reads every render as its caption says: the concept and the other attribute named
    assert all(set(scorer(images[i:i + 1], c.format(concept)).values()) == {1.0} for i, c in enumerate(captions))
