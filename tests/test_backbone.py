"""Backbone loading: every source, exact equality with open_clip, frozen weights, clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import make_model, sample_batch
from safetensors.torch import save_file

from numerics import assert_paths_within_rounding, features, model_sensitivity
import upperson
from upperson.backbone import BackboneLoadError, load_backbone
from upperson.backbone.loading import TINY_CONFIG


def _save_tiny_openai_checkpoint(path: Path, image_size=(224, 224)) -> dict[str, torch.Tensor]:
    state = load_backbone("tiny", image_size).clip.state_dict()
    torch.save({key: value.half() for key, value in state.items()}, path)  # fp16 like the OpenAI files
    return state


def test_all_petl_off_equals_open_clip_at_224(tmp_path: Path) -> None:
    """Same weights, same inputs: our encoders with no PETL compute open_clip's own features.

    Not bit for bit (the exact shortcuts and the lean QuickGELU are other fp32 kernels): both within
    ROUNDING_STAGES x S of the float64 features (tests/numerics.py).
    """
    checkpoint = tmp_path / "tiny-openai.pt"
    _save_tiny_openai_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    plain = open_clip.model.build_model_from_openai_state_dict(dict(state)).float()  # open_clip's own loader
    model = upperson.create_model(
        "up-person", backbone=str(checkpoint), image_size=224, prefix=False, lora=False, adapter=False
    )
    images, ids, _ = sample_batch(image_size=(224, 224), batch=2)
    inputs = {"images": images, "ids": ids}
    exact, sensitivity = model_sensitivity(model, features, inputs)  # open_clip's OpenAI build keeps LayerNorm in fp32
    with torch.no_grad():
        paths = {"ours": features(model, inputs), "open_clip": features(plain, inputs)}
    assert_paths_within_rounding(paths, exact, sensitivity)


def test_openai_checkpoint_round_trips_in_all_file_formats(tmp_path: Path) -> None:
    state = load_backbone("tiny", 224).clip.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    hashes = {load_backbone(str(tmp_path / name), 224).weights_sha256 for name in ("plain.pt", "wrapped.pth", "weights.safetensors")}
    assert hashes == {load_backbone("tiny", 224).weights_sha256}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_like_the_openai_release_files(tmp_path: Path) -> None:
    clip = load_backbone("tiny", 224).clip
    torch.jit.script(clip).save(str(tmp_path / "ViT-tiny.pt"))
    assert load_backbone(str(tmp_path / "ViT-tiny.pt"), 224).weights_sha256 == load_backbone("tiny", 224).weights_sha256


def test_open_clip_name_with_a_pretrained_file(tmp_path: Path) -> None:
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 224}}
    (tmp_path / "upperson-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "upperson-test-tiny.json")
    state = load_backbone("tiny", 224).clip.state_dict()
    torch.save(state, tmp_path / "weights.pt")
    loaded = load_backbone(f"upperson-test-tiny:{tmp_path / 'weights.pt'}", (64, 32))
    expected = upperson.backbone.resize_visual_pos_embed(state["visual.positional_embedding"], (4, 2))
    assert torch.equal(loaded.clip.visual.positional_embedding.detach(), expected)  # the same resize function
    assert torch.equal(loaded.clip.token_embedding.weight, state["token_embedding.weight"])


def test_architecture_is_read_from_the_weights(tmp_path: Path) -> None:
    _save_tiny_openai_checkpoint(tmp_path / "tiny.pt")
    spec = load_backbone(str(tmp_path / "tiny.pt"), (384, 128)).spec
    assert (spec.vision_width, spec.vision_layers, spec.vision_heads) == (192, 3, 3)
    assert (spec.text_width, spec.text_layers, spec.text_heads) == (128, 2, 2)
    assert spec.image_size == (384, 128) and spec.embed_dim == 64


def test_non_square_image_size_resizes_the_checkpoint_table_bilinearly(tmp_path: Path) -> None:
    state = _save_tiny_openai_checkpoint(tmp_path / "tiny.pt")
    clip = load_backbone(str(tmp_path / "tiny.pt"), (384, 128)).clip
    expected = upperson.backbone.resize_visual_pos_embed(state["visual.positional_embedding"].half().float(), (24, 8))
    assert clip.visual.positional_embedding.shape == (1 + 24 * 8, 192)
    assert torch.equal(clip.visual.positional_embedding.detach(), expected)  # the same resize of the same fp16 values


def test_backbone_is_frozen_and_only_petl_trains() -> None:
    model = make_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_state_dict())
    assert all(not p.requires_grad for p in model.backbone_state_dict().values())


def test_garbage_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneLoadError, match="broken.pt"):
        load_backbone(str(path))


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_is_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": _Payload()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(BackboneLoadError, match="evil.pt"):
        load_backbone(str(path))
    assert "pickle code ran" not in capsys.readouterr().out


def test_incomplete_state_dict_names_missing_keys(tmp_path: Path) -> None:
    state = load_backbone("tiny", 224).clip.state_dict()
    del state["visual.proj"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(BackboneLoadError, match=r"partial.pt.*visual.proj"):
        load_backbone(str(tmp_path / "partial.pt"))


def test_unknown_source_lists_the_options() -> None:
    with pytest.raises(BackboneLoadError, match="open_clip model"):
        load_backbone("no-such-model")


def test_image_size_must_fit_the_patch_grid() -> None:
    with pytest.raises(BackboneLoadError, match="patch size"):
        load_backbone("tiny", (100, 50))
