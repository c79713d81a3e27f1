"""The registry contract: a method defined only in this file plugs into every generic part of the package.

The toy method adds a learned shift after the final LayerNorm of each encoder. It declares its own
config class (one structural field, one init-only field), supports only SDM and ITC, and brings an
extra loss term; config loading, model building, parameter reports, training, adapter files,
ablation tables, official import and the CLI must all honour that without package code naming it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from open_clip.model import CLIP
from torch import nn

import upperson
from test_training import tiny_overrides, write_cuhk_fixture
from upperson.cli import main
from upperson.config import ConfigError, load_config
from upperson.experiments.ablate import describe_components
from upperson.methods import MethodEntry, MethodOptionError, register_method, unregister_method
from upperson.methods.official import import_official_state_dict
from upperson.petl import PETLModule
from upperson.training.loop import Trainer

TOY = "toy-shift"
PENALTY = 0.5


@dataclass(frozen=True)
class ToyShiftConfig:
    """Options of the toy method."""

    scale: float = 1.0
    """Multiplier of the learned shift (structural: it changes what the tensors compute)."""
    init: float = 0.01
    """Initial value of every shift entry (init-only: an adapter file need not match it)."""

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise MethodOptionError("scale", f"must be > 0, got {self.scale}")


class Shift(PETLModule):
    component = "shift"

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.shift = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.shift, self.init)


class ShiftedNorm(nn.Module):
    """The frozen LayerNorm, then ``scale · shift``."""

    def __init__(self, norm: nn.LayerNorm, config: ToyShiftConfig) -> None:
        super().__init__()
        self.norm = norm
        self.scale = config.scale
        self.offset = Shift(norm.normalized_shape[0], config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.scale * self.offset.shift.to(x.dtype)


def inject_shift(clip: CLIP, config: ToyShiftConfig) -> None:
    clip.ln_final = ShiftedNorm(clip.ln_final, config)
    clip.visual.ln_post = ShiftedNorm(clip.visual.ln_post, config)


def shift_penalty(model: upperson.RetrievalModel, image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
    shifts = [module.shift for module in model.petl_modules() if isinstance(module, Shift)]
    return {"shift_l2": PENALTY * sum((shift**2).sum() for shift in shifts)}


ENTRY = MethodEntry(
    name=TOY,
    config_class=ToyShiftConfig,
    inject=inject_shift,
    summary="a learned shift after each encoder's final LayerNorm (test method)",
    init_only_fields=frozenset({"init"}),
    losses=frozenset({"sdm", "itc"}),
    parameter_columns=("shift",),
    extra_loss_terms=shift_penalty,
)


@pytest.fixture
def toy() -> MethodEntry:
    register_method(ENTRY)
    yield ENTRY
    unregister_method(TOY)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2, "test": 2})


def toy_overrides(root: Path, output: Path, *extra: str) -> list[str]:
    base = [item for item in tiny_overrides(root, output, epochs=1) if not item.startswith("model.")]
    return [f"method={TOY}", *base, *extra]


def test_model_and_parameter_report(toy: MethodEntry) -> None:
    model = upperson.create_model(TOY, backbone="tiny", image_size=(64, 32), scale=2.0)
    spec = model.backbone_spec
    report = model.parameter_report()
    assert report.trainable == spec.vision_width + spec.text_width
    assert report.breakdown == {"vision": {"shift": spec.vision_width}, "text": {"shift": spec.text_width}}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"clip.ln_final.offset.shift", "clip.visual.ln_post.offset.shift"}
    assert model.entry is toy and model.method == TOY


def test_typed_model_section_and_loss_capabilities(toy: MethodEntry, tmp_path: Path) -> None:
    config = load_config(None, [f"method={TOY}", "model.scale=3"])
    assert config.model == ToyShiftConfig(scale=3.0, init=0.01)
    with pytest.raises(ConfigError, match=r"model\.scale must be a number, got 'abc'"):
        load_config(None, [f"method={TOY}", "model.scale=abc"])
    with pytest.raises(ConfigError, match=r"model\.scale must be > 0, got -1"):
        load_config(None, [f"method={TOY}", "model.scale=-1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['model\.lora_rank'\]"):
        load_config(None, [f"method={TOY}", "model.lora_rank=4"])
    with pytest.raises(ConfigError, match=r"\['id'\] not supported by method 'toy-shift' \(it supports sdm, itc\)"):
        load_config(None, [f"method={TOY}", "train.losses=[sdm,id]"])
    (tmp_path / "toy.yaml").write_text(f"method: {TOY}\nmodel:\n  scale: 2\n  scale: 3\n")
    with pytest.raises(ConfigError, match=r"toy\.yaml.*'scale' is written twice"):
        load_config(tmp_path / "toy.yaml")


def test_training_uses_the_extra_loss_and_adapter_files_follow_the_entry(toy: MethodEntry, fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, toy_overrides(fixture_root, tmp_path, "train.losses=[sdm,itc]", "run_name=toy"))
    result = Trainer(config, tmp_path / "toy").fit()
    with (tmp_path / "toy" / "history.csv").open() as handle:
        logged = {row["key"]: float(row["value"]) for row in csv.DictReader(handle)}
    assert {"loss_sdm", "loss_itc", "loss_shift_l2"} <= set(logged)
    assert logged["loss"] == pytest.approx(logged["loss_sdm"] + logged["loss_itc"] + logged["loss_shift_l2"], rel=1e-5)
    spec = upperson.create_model(TOY, backbone="tiny", image_size=(64, 32)).backbone_spec
    at_init = PENALTY * (spec.vision_width + spec.text_width) * 0.01**2
    assert 0.5 * at_init < logged["loss_shift_l2"] < 2 * at_init  # one epoch of steps moves the shifts little

    other_init = upperson.create_model(TOY, backbone="tiny", image_size=(64, 32), init=0.5)
    upperson.load_adapter(other_init, result.best_adapter)  # init-only field: loads
    saved = upperson.adapter_file.read_adapter(result.best_adapter)[0]
    assert torch.equal(other_init.clip.ln_final.offset.shift.detach(), saved["clip.ln_final.offset.shift"])
    with pytest.raises(upperson.AdapterMismatchError, match="scale: file 1.0 vs model 2.0"):
        upperson.load_adapter(upperson.create_model(TOY, backbone="tiny", image_size=(64, 32), scale=2.0), result.best_adapter)


def test_cli_ablation_and_official_import_ask_the_entry(toy: MethodEntry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--method", TOY, "--image-size", "64", "32", "--set", "scale=2"]) == 0
    out = capsys.readouterr().out
    assert "shift" in out.splitlines()[2] and "scale=2.0" in out
    assert describe_components(load_config(None, [f"method={TOY}", "model.scale=2"])) == "toy-shift [scale=2.0]"
    model = upperson.create_model(TOY, backbone="tiny", image_size=(64, 32))
    with pytest.raises(ValueError, match=r"import onto \['cskt', 'up-person'\] models, not 'toy-shift'"):
        import_official_state_dict(model, {})


def test_registry_rejects_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match="init_only_fields"):
        MethodEntry(name="bad", config_class=ToyShiftConfig, inject=inject_shift, init_only_fields=frozenset({"nope"}))
    with pytest.raises(ValueError, match="own encoders"):
        MethodEntry(name="bad", config_class=ToyShiftConfig, inject=inject_shift, encode_text=lambda clip, ids: ids)
    with pytest.raises(ValueError, match="already registered"):
        register_method(upperson.METHODS["up-person"])
