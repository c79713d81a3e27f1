"""Zero-shot and full fine-tuning baselines: what trains, what they compute, what they save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SMALL_IMAGE, sample_batch

from numerics import assert_paths_within_rounding, features, model_sensitivity
import upperson
from upperson.backbone import load_backbone
from upperson.config import load_config
from upperson.methods.exact_shortcuts import full_towers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_zero_shot_is_open_clip_and_trains_nothing() -> None:
    model = upperson.create_model("zero-shot", backbone="tiny", image_size=SMALL_IMAGE)
    clip = load_backbone("tiny", SMALL_IMAGE).clip
    images, ids, _ = sample_batch()
    inputs = {"images": images, "ids": ids}
    with torch.no_grad():
        with full_towers():  # the same computation as open_clip, bit for bit
            assert torch.equal(model.encode_image(images), clip.encode_image(images))
            assert torch.equal(model.encode_text(ids), clip.encode_text(ids))
        paths = {"shortcuts": features(model, inputs), "open_clip": features(clip, inputs)}
    # the exact shortcuts (last block on the CLS row, text up to the last EOT) are other fp32 kernels:
    # both within ROUNDING_STAGES x S of open_clip's float64 features (tests/numerics.py)
    exact, sensitivity = model_sensitivity(clip, features, inputs)
    assert_paths_within_rounding(paths, exact, sensitivity)
    assert not any(p.requires_grad for p in model.parameters())
    report = model.parameter_report()
    assert report.trainable == 0 and report.total == sum(p.numel() for n, p in clip.named_parameters() if n != "logit_scale")


def test_full_finetune_trains_every_clip_weight_but_the_temperature(tmp_path: Path) -> None:
    model = upperson.create_model("full-finetune", backbone="tiny", image_size=SMALL_IMAGE)
    images, ids, pids = sample_batch()
    upperson.losses.sdm_loss(*model(images, ids), pids).backward()
    for name, parameter in model.clip.named_parameters():
        assert parameter.requires_grad == (name != "logit_scale"), name
        if name not in ("logit_scale",):
            assert parameter.grad is not None, name
    report = model.parameter_report()
    assert report.trainable == report.total
    assert report.breakdown["vision"]["backbone"] == sum(p.numel() for p in model.clip.visual.parameters())
    assert report.breakdown["vision"]["backbone"] + report.breakdown["text"]["backbone"] == report.trainable

    with torch.no_grad():
        model.clip.visual.proj.add_(1.0)
    path = upperson.save_adapter(model, tmp_path / "full.safetensors")
    fresh = upperson.create_model("full-finetune", backbone="tiny", image_size=SMALL_IMAGE)
    upperson.load_adapter(fresh, path)
    assert torch.equal(fresh.encode_image(images), model.encode_image(images))  # fp32 through the file, same kernels


@pytest.mark.parametrize("method", ["zero-shot", "full-finetune", "cskt", "up-person"])
@pytest.mark.parametrize("dataset", ["cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_every_method_has_a_config_per_dataset(method: str, dataset: str) -> None:
    config = load_config(CONFIGS / method / f"{dataset}.yaml")
    assert config.method == method and config.data.dataset == dataset
    config.method_config()


@pytest.mark.parametrize("variants_file", sorted((CONFIGS / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_paper_ablation_file_resolves_on_the_paper_config(variants_file: Path, tmp_path: Path) -> None:
    """Each variant of each table's file builds a valid config (and method config) on the CUHK-PEDES setting."""
    from upperson.experiments.ablate import read_variants, variant_config

    for variant in read_variants(variants_file):
        config = variant_config(CONFIGS / "up-person" / "cuhk-pedes.yaml", [], variant, tmp_path)
        config.method_config()


def test_demo_config_file_matches_the_demo() -> None:
    from upperson.experiments.demo import demo_config

    file = load_config(CONFIGS / "demo" / "synthetic.yaml")
    demo = demo_config(Path(file.data.root), Path("runs") / "demo", 14, backbone=file.backbone)
    assert file.method_config() == demo.method_config()
    assert (file.data, file.optim, file.train.epochs, file.train.batch_size) == (demo.data, demo.optim, 14, 64)
