import json

import pytest
import torch
from safetensors.torch import save_file

from esd_lora.adapter import ADAPTER_NAME, lora_config, select_modules
from esd_lora.errors import AdapterError
from esd_lora.models import load_pipeline
from esd_lora.provenance import (AdapterProvenance, BaseIdentity, MergedProvenance, base_identity, check_adapter,
                                 read_metadata, unet_sha256)


def test_the_base_identity_does_not_depend_on_the_load_dtype(tiny_model):
    family, path = tiny_model
    identities = {dtype: base_identity(load_pipeline(str(path), dtype)) for dtype in ("fp32", "fp16", "bf16")}
    assert len({i.unet_sha256 for i in identities.values()}) == 1
    identity = identities["fp32"]
    assert identity.family == family and identity.resolution == 16
    assert identity.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


def test_a_pipeline_built_in_memory_is_hashed_as_it_is_without_its_lora_layers(tiny_models):
    stored = load_pipeline(str(tiny_models["sd1"]))
    in_memory = type(stored)(**stored.components)  # no folder behind it
    assert not in_memory.name_or_path
    assert unet_sha256(in_memory) == unet_sha256(stored)  # fp32 in memory: the same bytes as the stored fp32
    in_memory.unet.add_adapter(lora_config(2, 2.0, 0.0, "default", select_modules(in_memory.unet, "esd-x")),
                               adapter_name=ADAPTER_NAME)
    assert unet_sha256(in_memory) == unet_sha256(stored)
    with torch.no_grad():
        next(in_memory.unet.parameters()).add_(1.0)
    assert unet_sha256(in_memory) != unet_sha256(stored)


def test_records_round_trip_through_header_metadata():
    base = BaseIdentity("ab" * 32, "sd2", "v_prediction", 768)
    record = AdapterProvenance.for_base(base, concepts=["Van Gogh"], eta=2.0, target_spec="esd-x", steps=5,
                                        training_started_at=1764140000.5)
    meta = record.to_metadata()
    assert all(k.startswith("esd_lora.") and isinstance(v, str) for k, v in meta.items())
    assert meta["esd_lora.base_family"] == "sd2" and meta["esd_lora.resolution"] == "768"
    assert json.loads(meta["esd_lora.concepts"]) == ["Van Gogh"] and meta["esd_lora.target_spec"] == '"esd-x"'
    assert AdapterProvenance.from_metadata(meta, "x") == record
    assert "torch" in record.versions
    merged = MergedProvenance(erased=[["red"]], adapters_sha256=["cd" * 32], adapter_weights=[0.5], strategy="sum")
    assert MergedProvenance.from_metadata(merged.to_metadata(), "m") == merged
    assert AdapterProvenance.from_metadata({"esd_lora.steps": "7"}, "old").steps == 7  # older files: defaults
    with pytest.raises(AdapterError, match="esd_lora.concepts is not valid JSON"):
        AdapterProvenance.from_metadata({"esd_lora.concepts": "[oops"}, "bad.safetensors")


def test_the_compatibility_check_names_what_does_not_fit():
    base = BaseIdentity("ab" * 32, "sd1", "epsilon", 512)
    check_adapter("a", AdapterProvenance.for_base(base), base)
    with pytest.raises(AdapterError, match="no esd-lora provenance"):
        check_adapter("a", AdapterProvenance(), base)
    with pytest.raises(AdapterError, match="trained for an sdxl model, the base is sd1"):
        check_adapter("a", AdapterProvenance.for_base(BaseIdentity("ab" * 32, "sdxl", "epsilon", 1024)), base)
    with pytest.raises(AdapterError, match="trained for another base model"):
        check_adapter("a", AdapterProvenance.for_base(BaseIdentity("cd" * 32, "sd1", "epsilon", 512)), base)


def test_read_metadata_of_a_good_and_a_corrupt_file(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors", metadata={"k": "v"})
    assert read_metadata(tmp_path / "a.safetensors") == {"k": "v"}
    (tmp_path / "b.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(AdapterError, match="b.safetensors: not a readable safetensors file") as err:
        read_metadata(tmp_path / "b.safetensors")
    assert "\n" not in str(err.value)
