"""Shared fixtures: tiny random SD 1.x, SD 2.x (v-prediction) and SDXL pipelines, built in code
with fixed seeds, saved to disk and re-loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esd_lora.toy.vocab import build_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def _text(hidden: int, projection: bool, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_tiny_pipeline(family: str, out: Path) -> Path:
    """Save a tiny random pipeline of the family; returns its folder."""
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(0)
    tokenizer = build_tokenizer(out / "_tokenizer")
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    scheduler = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)
    if family in ("sd1", "sd2"):
        v = family == "sd2"
        unet = UNet2DConditionModel(**common, cross_attention_dim=16, attention_head_dim=(2, 4) if v else 4,
                                    use_linear_projection=v)
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=_text(16, False, len(tokenizer)), tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**scheduler, prediction_type="v_prediction" if v else "epsilon"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 20,
                                    transformer_layers_per_block=(1, 1))
        # two widths, as SDXL's 768 and 1280: diffusers' single-file loader tells the encoders apart by width
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text(12, False, len(tokenizer)), text_encoder_2=_text(20, True, len(tokenizer)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**scheduler))
    folder = out / family
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of the three tiny families, built once per test session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_pipeline(family, root) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_model(request, tiny_models) -> tuple[str, Path]:
    return request.param, tiny_models[request.param]


def make_adapter(model: Path, out: Path, prompts: list[str], targets: str = "esd-x", seed: int = 0,
                 alpha: float = 8.0, text_encoder: str = "", concept_tokens: bool = False) -> Path:
    """An adapter folder for a tiny model, with random (non-zero) LoRA weights and the provenance
    header a trained one has: merging and exporting only need a delta, not a good erasure. With
    `text_encoder` (a preset), the text encoder gets an adapter too; with `concept_tokens`, the embedding
    rows of the prompts' words that the preserve prompt ('a blue shape') does not use are retrained."""
    import json

    from esd_lora.adapter import (ADAPTER_NAME, WEIGHTS_NAME, add_text_adapter, concept_token_ids, lora_config,
                                  save_lora, select_modules, select_text_modules, token_config)
    from esd_lora.models import load_pipeline
    from esd_lora.provenance import AdapterProvenance, base_identity
    from esd_lora.recipe import ConceptSection

    pipe = load_pipeline(str(model))
    unet = pipe.unet
    metadata = AdapterProvenance.for_base(base_identity(pipe), concepts=prompts, recipe_name=out.name,
                                          target_spec=targets, base_model=str(model),
                                          training_started_at=1764140000.5).to_metadata()
    unet.add_adapter(lora_config(4, alpha, 0.0, "default", select_modules(unet, targets)), adapter_name=ADAPTER_NAME)
    text = pipe.text_encoder if text_encoder or concept_tokens else None
    if concept_tokens:
        concept = ConceptSection(prompts=prompts, preserve=["a blue shape"])
        add_text_adapter(text, token_config(select_text_modules(pipe, "", True)[0], concept_token_ids(pipe.tokenizer, concept)))
    elif text is not None:
        add_text_adapter(text, lora_config(4, alpha, 0.0, "default", select_text_modules(pipe, text_encoder)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in [*unet.named_parameters(), *(text.named_parameters() if text is not None else ())]:
            if "lora_" in name:
                p.normal_(0, 0.2)
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    save_lora(unet, out / WEIGHTS_NAME, metadata, text)
    (out / "recipe.yaml").write_text(f"concept:\n  prompts: {json.dumps(prompts)}\n  preserve: ['a blue shape']\n")
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Adapters for the tiny SD 1.x model (two of them, for stacking) and one for the SD 2.x model."""
    root = tmp_path_factory.mktemp("tiny_adapters")
    return {
        "red": make_adapter(tiny_models["sd1"], root / "red", ["a red shape"], seed=1),
        "star": make_adapter(tiny_models["sd1"], root / "star", ["a star"], targets="esd-x-strict", seed=2),
        "sd2": make_adapter(tiny_models["sd2"], root / "sd2", ["a red shape"], seed=3),
        "red_te": make_adapter(tiny_models["sd1"], root / "red_te", ["a red shape"], seed=4, text_encoder="attn"),
        "red_tokens": make_adapter(tiny_models["sd1"], root / "red_tokens", ["a red shape", "a crimson shape"], seed=5,
                                   concept_tokens=True),
    }


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP model and processor, saved to disk for the real loading path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_tokenizer(out / "_tokenizer")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
