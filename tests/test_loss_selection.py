"""Loss selection (paper Table X): strict config, sums of independent losses, the ID classifier, one step each."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from test_training import tiny_overrides, write_cuhk_fixture

from upperson.config import ConfigError, OptimConfig, load_config
from upperson.losses import id_loss, itc_loss, sdm_loss
from upperson.training.loop import Trainer
from upperson.training.objective import TrainingObjective
from upperson.training.schedule import build_optimizer


@pytest.fixture(scope="module")
def one_step_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 train ids x 2 images x 2 captions = 8 samples: one step at batch 8."""
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 2, "test": 1})


@pytest.mark.parametrize(
    ("value", "message"),
    [("[sdm,triplet]", "unknown loss"), ("[]", "at least one"), ("[sdm,sdm]", "twice"), ("sdm", "train.losses")],
)
def test_bad_loss_selections_are_rejected_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [f"train.losses={value}"])
    assert "train.losses" in str(error.value)


def test_losses_round_trip_through_the_config() -> None:
    config = load_config(None, ["train.losses=[sdm, id]", "train.id_lr_factor=5"])
    assert config.train.losses == ("sdm", "id") and config.to_dict()["train"]["losses"] == ["sdm", "id"]
    assert load_config(None).train.losses == ("sdm",)


def test_sdm_plus_itc_is_the_sum_of_the_independent_losses() -> None:
    image, text = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    pids = torch.tensor([0, 1, 0, 2, 1, 3])
    terms = TrainingObjective(("sdm", "itc"), embed_dim=16, num_classes=4, temperature=0.05)(image, text, pids)
    expected = sdm_loss(image, text, pids, temperature=0.05) + itc_loss(image, text, temperature=0.05)
    assert set(terms) == {"sdm", "itc"}
    assert torch.allclose(sum(terms.values()), expected, rtol=0, atol=1e-12)


def test_id_term_is_irra_classifier_on_unnormalised_features() -> None:
    objective = TrainingObjective(("sdm", "id"), embed_dim=16, num_classes=5, temperature=0.02)
    weight, bias = objective.classifier.weight, objective.classifier.bias
    assert weight.shape == (5, 16) and torch.equal(bias, torch.zeros(5))
    assert 0.0005 < weight.std().item() < 0.002  # N(0, 0.001)
    image, text, pids = torch.randn(4, 16), torch.randn(4, 16), torch.tensor([0, 4, 2, 0])
    expected = id_loss(F.linear(image, weight, bias), F.linear(text, weight, bias), pids)
    assert torch.allclose(objective(image, text, pids)["id"], expected)
    assert TrainingObjective(("sdm",), 16, 5, 0.02).classifier is None


def test_classifier_gets_its_own_learning_rate_and_the_usual_weight_decays() -> None:
    model = make_model()
    objective = TrainingObjective(("id",), model.backbone_spec.embed_dim, 7, 0.02)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, bias_lr_factor=2.0), head=objective, head_lr_factor=5.0)
    weight_group, bias_group = optimizer.param_groups[-2:]
    assert weight_group["params"] == [objective.classifier.weight] and bias_group["params"] == [objective.classifier.bias]
    assert weight_group["lr"] == bias_group["lr"] == pytest.approx(5e-3)
    assert weight_group["weight_decay"] == 4e-5 and bias_group["weight_decay"] == 0.0
    assert len(build_optimizer(model, OptimConfig(), head=TrainingObjective(("sdm",), 8, 7, 0.02)).param_groups) == 2


@pytest.mark.parametrize("losses", [["sdm"], ["itc"], ["sdm", "itc"], ["sdm", "id"]])
def test_each_combination_trains_one_step(losses: list[str], one_step_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(one_step_root, tmp_path, epochs=1) + [
        f"train.losses=[{','.join(losses)}]", "train.select_on=last", "optim.warmup_epochs=0",
    ]
    result = Trainer(load_config(None, overrides), tmp_path / "run").fit()
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    logged = {row["key"]: float(row["value"]) for row in rows}
    assert torch.isfinite(torch.tensor(logged["loss"]))
    if len(losses) > 1:
        assert logged["loss"] == pytest.approx(sum(logged[f"loss_{name}"] for name in losses), rel=1e-6)
    head = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["objective"]
    if "id" in losses:
        assert result.parameters["loss_head"] == head["classifier.weight"].numel() + head["classifier.bias"].numel()
        assert head["classifier.bias"].abs().sum() > 0  # the classifier was optimised (bias starts at 0)
    else:
        assert head == {} and result.parameters["loss_head"] == 0
