"""Every bad input becomes one clear error naming the file or field and what to do, raised at load time."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import make_model
from safetensors import safe_open
from safetensors.torch import save_file
from test_official import PREFIX, RANK, official_state_dict

import upperson
from upperson import AdapterMismatchError, cli
from upperson.backbone import BackboneLoadError, load_backbone
from upperson.backbone.loading import TINY_CONFIG
from upperson.cli import main
from upperson.config import ConfigError, load_config
from upperson.training.loop import CONFIG_FILE

# --- config value ranges ------------------------------------------------------------------------

BAD_VALUES = [
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("eval.chunk_size=0", "eval.chunk_size must be >= 1, got 0"),
    ("train.temperature=0", "train.temperature must be a finite number > 0, got 0.0"),
    ("train.temperature=-0.02", "train.temperature must be a finite number > 0, got -0.02"),
    ("data.image_size=[0,0]", "data.image_size must be two integers >= 1 (height, width), got [0, 0]"),
    ("data.image_size=[-384,128]", "data.image_size must be two integers >= 1 (height, width), got [-384, 128]"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.eval_every=0", "train.eval_every must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.grad_accumulation=0", "train.grad_accumulation must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("data.num_instances=0", "data.num_instances must be >= 1, got 0"),
    ("data.text_mask_prob=1.0", "data.text_mask_prob must be in [0, 1), got 1.0"),
    ("data.text_mask_prob=-0.1", "data.text_mask_prob must be in [0, 1), got -0.1"),
    ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
    ("optim.lr=-1e-3", "optim.lr must be a finite number > 0, got -0.001"),
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.adam_eps=0", "optim.adam_eps must be a finite number > 0, got 0.0"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[-0.1,0.999]", "optim.betas must be two numbers in [0, 1), got [-0.1, 0.999]"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0, got -1"),
    ("optim.warmup_factor=0", "optim.warmup_factor must be in (0, 1], got 0.0"),
    ("optim.warmup_factor=1.5", "optim.warmup_factor must be in (0, 1], got 1.5"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0, got -0.0001"),
    ("optim.bias_lr_factor=0", "optim.bias_lr_factor must be a finite number > 0, got 0.0"),
    ("train.id_lr_factor=0", "train.id_lr_factor must be a finite number > 0, got 0.0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[override for override, _ in BAD_VALUES])
def test_out_of_range_values_are_refused_at_load_time_naming_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == f"defaults: {message}"


def test_out_of_range_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("eval:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: eval.batch_size must be >= 1, got 0"


def test_zero_epochs_is_refused_by_train_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "Trainer", _raising(AssertionError("the trainer must not be built")))
    assert main(["train", "--set", "train.epochs=0"]) == 1
    assert _stderr_lines(capsys) == ["upperson train: error: defaults: train.epochs must be >= 1, got 0"]


def test_boundary_values_are_accepted() -> None:
    config = load_config(None, [
        "data.text_mask_prob=0", "data.num_workers=0", "data.num_instances=1", "optim.warmup_epochs=0",
        "optim.warmup_factor=1", "optim.betas=[0,0.5]", "train.epochs=1", "optim.weight_decay=0",
    ])
    assert config.train.epochs == 1 and config.data.num_workers == 0


# --- backbones ----------------------------------------------------------------------------------


def _one_line_naming(error: BaseException, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message and "\x1b" not in message, message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("size", [(100, 50), (0, 0), (-16, 16), (8, 8)])
def test_image_size_the_patch_grid_cannot_serve_names_source_size_and_patch(size: tuple[int, int]) -> None:
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone("tiny", size)
    _one_line_naming(caught.value, "tiny", f"{size[0]}x{size[1]}", "patch size 16", "data.image_size")


def test_image_size_error_suggests_the_nearest_sizes_that_fit() -> None:
    with pytest.raises(BackboneLoadError, match="e.g. 96x48"):
        load_backbone("tiny", (100, 50))


def test_image_size_error_names_the_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny-clip.pt"
    torch.save(load_backbone("tiny", 224).clip.state_dict(), path)
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(str(path), (385, 128))
    _one_line_naming(caught.value, str(path), "385x128", "patch size 16")


def test_image_size_error_names_the_open_clip_model(tmp_path: Path) -> None:
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 224}}
    (tmp_path / "upperson-test-tiny-sizes.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "upperson-test-tiny-sizes.json")
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone("upperson-test-tiny-sizes", (100, 50))
    _one_line_naming(caught.value, "upperson-test-tiny-sizes", "100x50", "patch size 16")


def test_checkpoint_whose_positional_table_is_not_a_square_grid_names_the_file(tmp_path: Path) -> None:
    state = load_backbone("tiny", 224).clip.state_dict()
    state["visual.positional_embedding"] = state["visual.positional_embedding"][:-3]  # 1 + 193 rows
    path = tmp_path / "odd-grid.pt"
    torch.save(state, path)
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(str(path), (64, 32))
    _one_line_naming(caught.value, str(path), "square")


def _truncated_safetensors(path: Path) -> None:
    save_file({"weight": torch.zeros(256)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_bytes(b"this is not a safetensors file at all"),
        lambda path: path.write_bytes(b""),
        _truncated_safetensors,
        lambda path: torch.save({"weight": torch.zeros(4)}, path),
    ],
    ids=["garbage", "empty", "truncated", "pickle"],
)
def test_corrupt_safetensors_backbone_is_one_line_naming_the_file(tmp_path: Path, write) -> None:
    path = tmp_path / "clip.safetensors"
    write(path)
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(str(path))
    _one_line_naming(caught.value, str(path), "safetensors")


def test_pickle_with_a_safetensors_name_gets_the_rename_hint(tmp_path: Path) -> None:
    path = tmp_path / "clip.safetensors"
    torch.save({"weight": torch.zeros(4)}, path)
    with pytest.raises(BackboneLoadError, match=r"torch\.save.*\.pt"):
        load_backbone(str(path))


class _RunsCode:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused_in_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": _RunsCode()}, path)
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(str(path))
    _one_line_naming(caught.value, str(path), "would call print", "state_dict()")
    assert "pickle code ran" not in capsys.readouterr().out


# --- adapter files ------------------------------------------------------------------------------


def _rewrite_adapter(tmp_path: Path, name: str, metadata_change=None, tensor_change=None) -> Path:
    """A copy of a fresh adapter file with its metadata or tensors edited by the given functions."""
    source = upperson.save_adapter(make_model(), tmp_path / "source.safetensors")
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata_change:
        metadata_change(metadata)
    if tensor_change:
        tensor_change(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("key", ["config", "backbone", "method"])
def test_adapter_without_a_metadata_key_names_file_and_key(tmp_path: Path, key: str) -> None:
    path = _rewrite_adapter(tmp_path, "no-key.safetensors", metadata_change=lambda metadata: metadata.pop(key))
    with pytest.raises(AdapterMismatchError) as caught:
        upperson.load_adapter(make_model(), path)
    _one_line_naming(caught.value, str(path), f"'{key}'", "missing")


@pytest.mark.parametrize(("key", "text"), [("config", "{not json"), ("backbone", "[1, 2]"), ("config", "null")])
def test_adapter_metadata_that_is_not_a_json_object_names_file_and_key(tmp_path: Path, key: str, text: str) -> None:
    path = _rewrite_adapter(tmp_path, "bad-json.safetensors", metadata_change=lambda metadata: metadata.update({key: text}))
    with pytest.raises(AdapterMismatchError) as caught:
        upperson.load_adapter(make_model(), path)
    _one_line_naming(caught.value, str(path), f"'{key}'", "JSON object")


def test_adapter_of_a_newer_format_asks_to_upgrade(tmp_path: Path) -> None:
    path = _rewrite_adapter(tmp_path, "future.safetensors", metadata_change=lambda metadata: metadata.update(format_version="2"))
    with pytest.raises(AdapterMismatchError) as caught:
        upperson.load_adapter(make_model(), path)
    _one_line_naming(caught.value, str(path), "newer upperson (format 2)", "upgrade")


def test_adapter_with_an_unreadable_format_version_is_refused(tmp_path: Path) -> None:
    path = _rewrite_adapter(tmp_path, "odd.safetensors", metadata_change=lambda metadata: metadata.update(format_version="one"))
    with pytest.raises(AdapterMismatchError) as caught:
        upperson.load_adapter(make_model(), path)
    _one_line_naming(caught.value, str(path), "format_version", "'one'")


def _first_tensor_to(change):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        name = min(tensors)
        tensors[name] = change(tensors[name])

    return edit


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda tensor: tensor.to(torch.int64), "torch.int64"),
        (lambda tensor: torch.full_like(tensor, float("nan")), "NaN or inf"),
        (lambda tensor: torch.full_like(tensor, float("inf")), "NaN or inf"),
    ],
    ids=["int64", "nan", "inf"],
)
def test_adapter_tensor_that_is_not_finite_floating_point_is_refused_naming_it(tmp_path: Path, change, problem: str) -> None:
    path = _rewrite_adapter(tmp_path, "tensors.safetensors", tensor_change=_first_tensor_to(change))
    name = min(make_model().trainable_state_dict())
    with pytest.raises(AdapterMismatchError) as caught:
        upperson.load_adapter(make_model(), path)
    _one_line_naming(caught.value, str(path), name, problem)


# --- the CLI: one line per error, exit codes ----------------------------------------------------


def _raising(error: BaseException):
    def handler(*args, **kwargs) -> int:
        raise error

    return handler


def _stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("code", "os_message", "hint"),
    [
        (errno.ENOSPC, "No space left on device", "free disk space or write elsewhere"),
        (errno.EACCES, "Permission denied", "check its permissions or write elsewhere"),
        (errno.EROFS, "Read-only file system", "the file system is read-only; write elsewhere"),
    ],
    ids=["ENOSPC", "EACCES", "EROFS"],
)
def test_os_errors_are_one_line_naming_the_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int, os_message: str, hint: str
) -> None:
    monkeypatch.setattr(cli, "_info", _raising(OSError(code, os_message, "/x/run")))
    assert main(["info"]) == 1
    assert _stderr_lines(capsys) == [f"upperson info: error: /x/run: {os_message}; {hint}"]


def test_os_error_without_a_path_keeps_its_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_info", _raising(FileNotFoundError("adapter file a.safetensors does not exist")))
    assert main(["info"]) == 1
    assert _stderr_lines(capsys) == ["upperson info: error: adapter file a.safetensors does not exist"]


def test_unexpected_error_is_one_internal_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_info", _raising(RuntimeError("boom\nsecond line")))
    assert main(["info"]) == 1
    assert _stderr_lines(capsys) == ["upperson info: internal error: RuntimeError: boom second line (run with -v for the traceback)"]


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), ValueError("bad value"), OSError(errno.ENOSPC, "No space left on device", "/x/run")],
    ids=["unexpected", "expected", "os"],
)
def test_verbose_prints_the_traceback_before_the_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    monkeypatch.setattr(cli, "_info", _raising(error))
    assert main(["info"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("upperson info: ")


def test_ctrl_c_is_one_line_with_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_info", _raising(KeyboardInterrupt()))
    assert main(["info"]) == 130
    assert _stderr_lines(capsys) == ["upperson info: interrupted"]


class _InterruptedTrainer:
    """Stands in for the trainer: writes the run's config like the real one, then gets Ctrl-C."""

    def __init__(self, config, run_dir: Path, **options) -> None:
        self.run_dir = Path(run_dir)

    def fit(self, resume: bool = False, overwrite: bool = False):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text("{}\n")
        raise KeyboardInterrupt


def test_ctrl_c_in_train_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "Trainer", _InterruptedTrainer)
    run_dir = tmp_path / "given"
    assert main(["train", "--run-dir", str(run_dir), "--set", "device=cpu"]) == 130
    assert _stderr_lines(capsys)[-1] == f"upperson train: interrupted; resume with: upperson train --resume {run_dir}"
    monkeypatch.setattr(cli, "default_run_dir", lambda config: tmp_path / "runs" / "timestamped")
    assert main(["train", "--set", "device=cpu"]) == 130
    assert _stderr_lines(capsys)[-1] == f"upperson train: interrupted; resume with: upperson train --resume {tmp_path / 'runs' / 'timestamped'}"


def test_ctrl_c_before_a_run_directory_exists_gives_no_resume_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "load_config", _raising(KeyboardInterrupt()))
    assert main(["train", "--run-dir", str(tmp_path / "never")]) == 130
    assert _stderr_lines(capsys) == ["upperson train: interrupted"]


def test_usage_errors_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--no-such-flag"]) == 2
    assert main(["convert"]) == 2


# --- convert ------------------------------------------------------------------------------------


@pytest.fixture
def official_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "official.pth"
    torch.save({"model": official_state_dict(image_size=(64, 32))}, path)
    return path


def _convert(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(checkpoint), "--out", str(out), "--image-size", "64", "32", *extra])


def test_convert_refuses_an_existing_directory_as_out(official_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapters"
    out.mkdir()
    assert _convert(official_checkpoint, out) == 1
    assert _stderr_lines(capsys) == [
        f"upperson convert: error: --out {out} is a directory; give the adapter file to write, e.g. {out / 'adapter.safetensors'}"
    ]
    assert _convert(official_checkpoint, out, "--overwrite") == 1


def test_convert_never_overwrites_a_file_silently(official_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(b"keep me")
    assert _convert(official_checkpoint, out) == 1
    assert _stderr_lines(capsys) == [f"upperson convert: error: {out} exists; pass --overwrite to replace it"]
    assert out.read_bytes() == b"keep me"
    assert _convert(official_checkpoint, out, "--overwrite") == 0
    upperson.load_adapter(make_model(prefix_length=PREFIX, lora_rank=RANK), out, allow_other_backbone_weights=True)


@pytest.mark.parametrize(("name", "content"), [("broken.pth", b"\x80\x02garbage"), ("broken.safetensors", b"garbage")])
def test_convert_of_a_corrupt_checkpoint_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes
) -> None:
    checkpoint = tmp_path / name
    checkpoint.write_bytes(content)
    assert _convert(checkpoint, tmp_path / "a.safetensors") == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"upperson convert: error: {checkpoint}: ")
    assert not (tmp_path / "a.safetensors").exists()


def test_bad_backbone_through_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": _RunsCode()}, path)
    assert main(["info", "--backbone", str(path)]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"upperson info: error: {path}: refused")
