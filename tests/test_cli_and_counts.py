"""CLI commands and the paper's parameter counts against closed-form formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, sample_batch
from test_official import PREFIX, RANK, official_state_dict

import upperson
from upperson.cli import main


def closed_form_trainable(widths_layers: list[tuple[int, int]], prefix: int, rank: int, reduction: int) -> int:
    """Spec §3, per block: LoRA 2·r·2d + 2; prefix 2·L·d + 3; adapters 2·(d·d/r + d/r + d/r·d + d) + 2."""
    total = 0
    for width, layers in widths_layers:
        hidden = width // reduction
        per_block = (2 * rank * 2 * width + 2) + (2 * prefix * width + 3) + (2 * (width * hidden + hidden + hidden * width + width) + 2)
        total += layers * per_block
    return total


@pytest.mark.parametrize(
    ("prefix", "rank", "expected"),
    [(10, 32, 7_419_816), (14, 32, 7_542_696), (2, 16, 6_191_016)],
    ids=["cuhk", "icfg", "rstp"],
)
def test_paper_parameter_counts_for_vit_b16_at_384x128(prefix: int, rank: int, expected: int) -> None:
    model = upperson.create_model("up-person", backbone="ViT-B-16-quickgelu", image_size=(384, 128), prefix_length=prefix, lora_rank=rank)
    report = model.parameter_report()
    assert report.trainable == expected == closed_form_trainable([(768, 12), (512, 12)], prefix, rank, 8)
    assert report.total - report.trainable == 149_617_664  # CLIP ViT-B/16 at 384x128 without logit_scale
    if prefix == 10:
        assert report.total == 157_037_480
        assert report.breakdown["vision"]["adapter"] == 3_559_704 and report.breakdown["text"]["adapter"] == 1_586_712
        assert report.breakdown["vision"]["prefix"] == 184_356 and report.breakdown["text"]["prefix"] == 122_916
        assert report.breakdown["vision"]["lora"] + report.breakdown["text"]["lora"] == 1_966_128


def test_tiny_count_matches_the_formula() -> None:
    model = make_model(prefix_length=5, lora_rank=4)
    assert model.parameter_report().trainable == closed_form_trainable([(192, 3), (128, 2)], 5, 4, 8)


def test_info_prints_the_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backbone", "tiny", "--image-size", "64", "32", "--set", "prefix_length=5", "--set", "lora_rank=4"]) == 0
    out = capsys.readouterr().out
    expected = closed_form_trainable([(192, 3), (128, 2)], 5, 4, 8)
    assert f"trainable {expected:,} of" in out and "vision" in out and "adapter" in out


def test_info_reports_bad_options_with_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--set", "prefix_lenght=4"]) == 1
    assert "prefix_length" in capsys.readouterr().err
    assert main(["info", "--no-such-flag"]) == 2


def test_convert_writes_an_adapter_that_reproduces_the_official_model(tmp_path: Path) -> None:
    official = official_state_dict(image_size=(64, 32))
    torch.save({"model": official}, tmp_path / "official.pth")
    out = tmp_path / "adapter.safetensors"
    assert main(["convert", str(tmp_path / "official.pth"), "--out", str(out), "--image-size", "64", "32"]) == 0

    direct = make_model(prefix_length=PREFIX, lora_rank=RANK)
    upperson.import_official_state_dict(direct, official)
    converted = make_model(prefix_length=PREFIX, lora_rank=RANK)
    upperson.load_adapter(converted, out, allow_other_backbone_weights=True)  # same tiny CLIP, fp32 round trip
    images, ids, _ = sample_batch()
    with torch.no_grad():
        torch.testing.assert_close(converted.encode_text(ids), direct.encode_text(ids), rtol=1e-5, atol=1e-6)


def test_convert_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "a.safetensors")]) == 1
    assert "nope.pth" in capsys.readouterr().err
