"""Profiling: FLOPs against a closed-form count of the tiny CLIP and against open_clip itself; the CLI report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import upperson
from upperson.cli import main
from upperson.config import load_config
from upperson.experiments import profile
from upperson.experiments.profile import PeakMemory, count_flops
from upperson.training import step

TINY = ["backbone=tiny", "data.image_size=[64,32]", "train.precision=fp32", "device=cpu", "model.prefix_length=2", "model.lora_rank=2"]
NO_PETL = ["model.prefix=false", "model.lora=false", "model.adapter=false"]


def _tower_flops(tokens: int, width: int, layers: int, hidden: int) -> int:
    """2 x MACs of one pre-LN transformer: QKV, QKᵀ, AV, out projection, two MLP layers per block."""
    per_block = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
    per_block += 2 * 2 * tokens * width * hidden
    return layers * per_block


def closed_form_flops(clip: torch.nn.Module, image_size: tuple[int, int], context_length: int) -> tuple[int, int]:
    """Image and caption forward FLOPs of an open_clip ViT CLIP, from its layer shapes only."""
    visual = clip.visual
    patch = visual.conv1.kernel_size[0]
    patches = (image_size[0] // patch) * (image_size[1] // patch)
    width, embed = visual.conv1.out_channels, visual.proj.shape[1]
    block = visual.transformer.resblocks[0]
    image = 2 * patches * (3 * patch * patch) * width  # patch embedding
    image += _tower_flops(patches + 1, width, len(visual.transformer.resblocks), block.mlp.c_fc.out_features)
    image += 2 * width * embed  # CLS projection
    text_width = clip.token_embedding.embedding_dim
    text_block = clip.transformer.resblocks[0]
    text = _tower_flops(context_length, text_width, len(clip.transformer.resblocks), text_block.mlp.c_fc.out_features)
    text += 2 * text_width * clip.text_projection.shape[1]  # EOT projection
    return image, text


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One CLI run: the base config without PETL, and UP-Person with SDM + ID as a variant."""
    tmp_path = tmp_path_factory.mktemp("profile")
    variants = tmp_path / "variants.yaml"
    variants.write_text("- {name: up-person+id, set: {model.prefix: true, model.lora: true, model.adapter: true, train.losses: [sdm, id]}}\n")
    argv = ["profile", "--batch-size", "2", "--steps", "1", "--num-classes", "10", "--variants", str(variants),
            "--json", str(tmp_path / "profile.json")]
    for item in TINY + NO_PETL:
        argv += ["--set", item]
    assert main(argv) == 0
    plain, petl = json.loads((tmp_path / "profile.json").read_text())
    return {"plain": plain, "petl": petl}


def test_flops_match_a_closed_form_count_and_open_clip(profiled: dict[str, dict]) -> None:
    plain, petl = profiled["plain"], profiled["petl"]
    clip = upperson.load_backbone("tiny", (64, 32)).clip.eval()
    image_flops, text_flops = closed_form_flops(clip, (64, 32), clip.context_length)
    images = torch.randn(1, 3, 64, 32)
    captions = upperson.tokenize(["a person in a red coat"])
    assert count_flops(clip.encode_image, images) == image_flops  # open_clip's own encoder, attention included
    assert count_flops(clip.encode_text, captions) == text_flops
    assert plain["gflops_per_image"] * 1e9 == pytest.approx(image_flops, rel=1e-12)
    assert plain["gflops_per_text"] * 1e9 == pytest.approx(text_flops, rel=1e-12)
    assert petl["gflops_per_image"] > plain["gflops_per_image"] and petl["gflops_per_text"] > plain["gflops_per_text"]


def test_parameters_memory_and_throughput_are_reported(profiled: dict[str, dict]) -> None:
    plain, petl = profiled["plain"], profiled["petl"]
    assert plain["trainable_parameters"] == 0 and plain["train_peak_bytes"] is None  # nothing to train
    assert petl["total_parameters"] == plain["total_parameters"] + petl["trainable_parameters"]
    petl_only = upperson.create_model("up-person", backbone="tiny", image_size=(64, 32), prefix_length=2, lora_rank=2)
    classifier = 10 * (petl_only.backbone_spec.embed_dim + 1)  # embed_dim -> 10 ids, with bias
    assert petl["trainable_parameters"] - petl_only.parameter_report().trainable == classifier
    assert petl["train_peak_bytes"] > petl["train_step_bytes"] > 0
    assert petl["images_per_s"] > 0 and petl["texts_per_s"] > 0 and petl["device"] == "cpu"


def test_peak_memory_sees_a_large_allocation() -> None:
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.delta >= 60 * 2**20 and memory.peak >= memory.delta


def test_cli_profile_usage_and_failures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--batch-size", "0"]) == 1
    assert main(["profile", "--method", "nonsense"]) == 2
    assert main(["profile", "--set", "train.losses=[sdm,id]", "--set", "data.root=/nonexistent"]) == 1
    assert "--num-classes" in capsys.readouterr().err


def test_flops_include_multihead_attention_on_its_inference_fast_path() -> None:
    """Even head counts in eval mode take MHA's fused fast path; its projections and attention still count."""
    width, heads, tokens = 64, 4, 5
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
    x = torch.randn(2, tokens, width)
    projections = 2 * 2 * tokens * (3 * width * width + width * width)  # in + out projections, 2 samples
    scores = 2 * 2 * 2 * tokens * tokens * width  # QK^T and AV, 2 samples
    assert count_flops(lambda inp: attention(inp, inp, inp, need_weights=False), x) == projections + scores
    assert torch.backends.mha.get_fastpath_enabled()


def test_cli_profile_with_the_mlm_head(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--backbone", "tiny", "--image-size", "64", "32", "--batch-size", "2", "--device", "cpu",
            "--set", "train.precision=fp32", "--set", "train.losses=[sdm,id,mlm]", "--num-classes", "10",
            "--set", "model.prefix_length=2", "--set", "model.lora_rank=2", "--steps", "1", "--json", str(out)]
    assert main(argv) == 0
    row = json.loads(out.read_text())[0]
    assert row["train_peak_bytes"] > 0 and row["trainable_parameters"] > 0


def test_profile_builds_the_model_the_trainer_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 the profiled model stores its frozen matmul weights in bf16, as training does."""
    built = []

    def recording_build_training(*args: object, **kwargs: object) -> step.TrainingParts:
        built.append(step.build_training(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(profile, "build_training", recording_build_training)
    overrides = [item for item in TINY if not item.startswith("train.precision")] + ["train.precision=bf16"]
    result = profile.profile_config(load_config(None, overrides), batch_size=2, steps=1, warmup=0)
    assert result.precision == "bf16" and result.train_peak_bytes > 0 and result.gflops_per_image > 0
    model = built[0].model
    assert model.clip.visual.transformer.resblocks[-1].mlp.c_fc.weight.dtype == torch.bfloat16
    converted = sum(
        isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.dtype == torch.bfloat16 for module in model.clip.modules()
    )
    reference = upperson.create_model("up-person", backbone="tiny", image_size=(64, 32), prefix_length=2, lora_rank=2)
    assert converted == reference.store_frozen_matmul_weights(torch.bfloat16) > 0
