"""The shipped toy world: classifier, pipeline files, round trip and the quality bar on a reduced sample."""

import numpy as np
import pytest
import torch

from esd_lora.toy.classifier import accuracy, labelled_batch, load_classifier
from esd_lora.toy.paths import CLASSIFIER_PATH, MODEL_DIR, WEIGHTS_DIR
from esd_lora.toy.quality import quality_table
from esd_lora.toy.vocab import kind_of


def test_classifier_reads_fresh_renders():
    images, labels = labelled_batch(np.random.default_rng(12345), 600)
    acc = accuracy(load_classifier(), images, labels)
    assert min(acc.values()) >= 0.98, acc


def test_shipped_model_is_a_plain_offline_sd_pipeline_under_25_mb():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("attn2.to_k") for n in names)
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, size
    assert CLASSIFIER_PATH.exists()


def test_pipeline_round_trip(tmp_path):
    from esd_lora.models import load_pipeline
    from esd_lora.sample import generate

    pipe = load_pipeline("toy")
    pipe.save_pretrained(tmp_path)
    again = load_pipeline(str(tmp_path))
    a = generate(pipe, ["a red star", "a blue ring"], [0, 1], steps=10, progress=False)
    b = generate(again, ["a red star", "a blue ring"], [0, 1], steps=10, progress=False)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def reduced_quality():
    return quality_table("toy", n=8, seed=1000)


def _bar(quality: dict, kinds: tuple[str, ...]) -> None:
    single = {c: r for c, r in quality["single"].items() if kind_of(c) in kinds}
    rates = [r for words in single.values() for r in words.values()]
    triple = [rates[k] for rates in quality["triple"].values() for k in kinds]
    assert np.mean(rates) >= 0.9 and np.mean(triple) >= 0.85, (single, quality["triple"])
    # per prompt, 8 images: allow one miss more than the 90 % bar on the full sample does
    assert min(rates) >= 0.75, single


@pytest.mark.parametrize("kind", ["colour", "shape", "texture"])
def test_quality_bar_on_a_reduced_sample(reduced_quality, kind):
    _bar(reduced_quality, (kind,))
