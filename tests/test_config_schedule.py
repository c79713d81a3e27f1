"""Strict configs and the official optimizer / learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model

from upperson.config import ConfigError, OptimConfig, load_config, save_config
from upperson.training.schedule import build_optimizer, build_scheduler, lr_multiplier

CONFIGS = Path(__file__).parent.parent / "configs" / "up-person"


def test_schedule_reproduces_the_official_table() -> None:
    """Spec B.10, epochs 1..60."""
    table = {1: 0.10, 2: 0.28, 3: 0.46, 4: 0.64, 5: 0.82, 6: 1.0, 7: 0.99918, 10: 0.98701, 20: 0.84847,
             30: 0.59930, 40: 0.31860, 50: 0.09549, 59: 0.00326, 60: 0.00082}
    for epoch, expected in table.items():
        assert lr_multiplier(epoch - 1, 60) == pytest.approx(expected, abs=5e-6)


def test_scheduler_steps_per_epoch_on_every_group() -> None:
    model = make_model()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, bias_lr_factor=2.0))
    scheduler = build_scheduler(optimizer, OptimConfig(), total_epochs=60)
    seen = []
    for _ in range(7):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([1e-4, 2e-4]) and seen[1] == pytest.approx([2.8e-4, 5.6e-4])
    assert seen[6] == pytest.approx([0.99918e-3, 1.99836e-3], rel=1e-4)


def test_optimizer_groups_follow_the_official_rules() -> None:
    model = make_model()
    optimizer = build_optimizer(model, OptimConfig())
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["eps"] == 1e-3
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 4e-5 and not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.trainable_state_dict())


@pytest.mark.parametrize(("name", "prefix", "rank", "lr"), [("cuhk-pedes", 10, 32, 1e-3), ("icfg-pedes", 14, 32, 1e-3), ("rstpreid", 2, 16, 1e-4)])
def test_paper_configs_load(name: str, prefix: int, rank: int, lr: float) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (config.model.prefix_length, config.model.lora_rank, config.optim.lr) == (prefix, rank, lr)
    assert (config.train.batch_size, config.train.epochs, config.data.image_size) == (128, 60, (384, 128))
    assert config.data.dataset == name and config.data.text_mask_prob == 0.15


def test_overrides_are_typed_and_unknown_keys_rejected(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "cuhk-pedes.yaml", ["data.root=/data", "optim.lr=2e-4", "model.prefix_length=4", "backbone=x.pt"])
    assert (config.data.root, config.optim.lr, config.model.prefix_length, config.backbone) == ("/data", 2e-4, 4, "x.pt")
    with pytest.raises(ConfigError, match="data.rooot"):
        load_config(None, ["data.rooot=/x"])
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="prefx"):
        load_config(None, ["model.prefx=2"])
    (tmp_path / "bad.yaml").write_text("train:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.bogus"):
        load_config(tmp_path / "bad.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "icfg-pedes.yaml", ["data.root=/d"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
