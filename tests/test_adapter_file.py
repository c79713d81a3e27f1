"""Adapter files: round trip, small size, strict metadata checks, several adapters on one backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, randomise_petl, sample_batch
from safetensors import safe_open
from safetensors.torch import save_file

import upperson
from upperson import AdapterMismatchError


def test_round_trip_restores_features_exactly(tmp_path: Path) -> None:
    trained = make_model()
    randomise_petl(trained)
    path = upperson.save_adapter(trained, tmp_path / "a.safetensors")
    fresh = make_model()
    metadata = upperson.load_adapter(fresh, path)
    images, ids, _ = sample_batch()
    with torch.no_grad():
        for a, b in zip(trained(images, ids), fresh(images, ids)):
            assert torch.equal(a, b)
    assert metadata["method"] == "up-person" and metadata["config"]["prefix_length"] == 3


def test_file_holds_only_trainable_tensors_and_metadata(tmp_path: Path) -> None:
    model = make_model()
    path = upperson.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == set(model.trainable_state_dict())
    assert json.loads(metadata["backbone"])["vision_width"] == 192
    assert metadata["backbone_sha256"] == model.backbone_sha256 and len(metadata["backbone_sha256"]) == 64
    assert metadata["upperson_version"] == upperson.__version__
    expected_bytes = 4 * sum(t.numel() for t in model.trainable_state_dict().values())
    assert expected_bytes < path.stat().st_size < expected_bytes + 64 * 1024


def test_several_adapters_load_in_turn_onto_one_backbone(tmp_path: Path) -> None:
    model = make_model()
    images, ids, _ = sample_batch()
    paths, outputs = [], []
    for seed in (1, 2):
        randomise_petl(model, seed=seed)
        paths.append(upperson.save_adapter(model, tmp_path / f"scenario{seed}.safetensors"))
        with torch.no_grad():
            outputs.append(model.encode_text(ids))
    for path, expected in zip(paths, outputs):
        upperson.load_adapter(model, path)
        with torch.no_grad():
            assert torch.equal(model.encode_text(ids), expected)


def test_loading_onto_a_merged_model_keeps_it_merged_and_correct(tmp_path: Path) -> None:
    source = make_model()
    randomise_petl(source)
    path = upperson.save_adapter(source, tmp_path / "a.safetensors")
    target = make_model()
    target.merge_lora()
    upperson.load_adapter(target, path)
    assert target.lora_merged
    images, ids, _ = sample_batch()
    with torch.no_grad():
        torch.testing.assert_close(target.encode_image(images), source.encode_image(images), rtol=1e-5, atol=1e-5)


def test_other_config_is_rejected_naming_the_field(tmp_path: Path) -> None:
    path = upperson.save_adapter(make_model(lora_rank=4), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="lora_rank"):
        upperson.load_adapter(make_model(lora_rank=8), path)


def test_init_only_fields_do_not_block_loading(tmp_path: Path) -> None:
    path = upperson.save_adapter(make_model(lambda_init=100.0), tmp_path / "a.safetensors")
    upperson.load_adapter(make_model(lambda_init=10.0, attention_backend="explicit"), path)


def test_other_architecture_is_rejected(tmp_path: Path) -> None:
    path = upperson.save_adapter(make_model(), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="architecture"):
        upperson.load_adapter(make_model(image_size=(32, 32)), path)


def test_other_backbone_weights_need_the_override(tmp_path: Path) -> None:
    model = make_model()
    path = upperson.save_adapter(model, tmp_path / "a.safetensors")
    other = make_model()
    with torch.no_grad():
        other.clip.ln_final.weight.add_(0.1)
    other.refresh_backbone_fingerprint()
    with pytest.raises(AdapterMismatchError, match="allow_other_backbone_weights"):
        upperson.load_adapter(other, path)
    upperson.load_adapter(other, path, allow_other_backbone_weights=True)


def test_wrong_method_and_tampered_shapes_are_rejected(tmp_path: Path) -> None:
    model = make_model()
    path = upperson.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(tmp_path / "method.safetensors"), metadata={**metadata, "method": "cskt"})
    with pytest.raises(AdapterMismatchError, match="cskt"):
        upperson.load_adapter(model, tmp_path / "method.safetensors")
    name = next(iter(tensors))
    save_file({**tensors, name: torch.zeros(1, 2)}, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(AdapterMismatchError, match="shape"):
        upperson.load_adapter(model, tmp_path / "shape.safetensors")


def test_not_an_adapter_file(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterMismatchError, match="x.safetensors"):
        upperson.load_adapter(make_model(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        upperson.load_adapter(make_model(), tmp_path / "missing.safetensors")


def test_a_file_without_a_newer_config_field_loads_as_that_fields_default(tmp_path: Path) -> None:
    """Adapter files written before a config field existed (e.g. adapter_placement) stay loadable."""
    model = upperson.create_model("up-person", backbone="tiny", image_size=(64, 32), prefix_length=2, lora_rank=2)
    path = upperson.save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["config"])
    config.pop("adapter_placement", None)
    config.pop("lora_type", None)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "config": json.dumps(config)})
    upperson.load_adapter(model, old)
