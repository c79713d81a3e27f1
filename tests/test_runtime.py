"""The runtime owner: device and precision resolution (hardware probes stubbed), autocast, scaler, seeds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from upperson import runtime
from upperson.data.samplers import build_train_sampler
from upperson.runtime import autocast, epoch_seed, grad_scaler, resolve_device, resolve_precision

CUDA = torch.device("cuda")  # only handed to stubbed probes: nothing runs on it
CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.fixture(autouse=True)
def fresh_log_memory() -> None:
    """Each test sees the once-per-process precision messages again."""
    runtime._log_once.cache_clear()


def stub_hardware(monkeypatch: pytest.MonkeyPatch, cpu: frozenset[str] = AVX2_ONLY, cuda_bf16: bool = False) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: cpu)
    monkeypatch.setattr(runtime, "cuda_supports_bf16", lambda device: cuda_bf16)


@pytest.mark.parametrize(
    ("device", "cpu", "cuda_bf16", "expected"),
    [
        (CUDA, AVX2_ONLY, True, "bf16"),
        (CUDA, AVX2_ONLY, False, "fp16"),
        (CPU, AVX2_ONLY | {"avx512f", "avx512_bf16"}, False, "bf16"),
        (CPU, AVX2_ONLY | {"amx_tile", "amx_bf16"}, False, "bf16"),
        (CPU, AVX2_ONLY, True, "fp32"),
    ],
    ids=["cuda-bf16", "cuda-no-bf16", "cpu-avx512-bf16", "cpu-amx", "cpu-avx2-only"],
)
def test_auto_picks_the_native_precision(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, cpu: frozenset[str], cuda_bf16: bool, expected: str
) -> None:
    stub_hardware(monkeypatch, cpu, cuda_bf16)
    assert resolve_precision("auto", device) == expected


def test_explicit_precision_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    stub_hardware(monkeypatch, AVX2_ONLY, cuda_bf16=True)
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("bf16", CPU) == "bf16"
    stub_hardware(monkeypatch, AVX2_ONLY | {"avx512_bf16"})
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="choose one of auto, bf16, fp16, fp32"):
        resolve_precision("tf32", CPU)


def test_auto_is_logged_once_with_its_reason(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    stub_hardware(monkeypatch, AVX2_ONLY)
    with caplog.at_level(logging.INFO, logger="upperson.runtime"):
        resolve_precision("auto", CPU)
        resolve_precision("auto", CPU)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and caplog.records[0].levelno == logging.INFO
    assert messages[0].startswith("precision auto -> fp32 (CPU without native bf16")
    assert "avx512_bf16" in messages[0] and "/proc/cpuinfo" in messages[0]


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    stub_hardware(monkeypatch, AVX2_ONLY)
    with caplog.at_level(logging.INFO, logger="upperson.runtime"):
        assert resolve_precision("bf16", CPU) == "bf16"
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "slow" in caplog.records[0].getMessage()
    caplog.clear()
    stub_hardware(monkeypatch, AVX2_ONLY | {"avx512_bf16"})
    with caplog.at_level(logging.INFO, logger="upperson.runtime"):
        assert resolve_precision("bf16", CPU) == "bf16"
    assert not caplog.records


def test_cpu_flags_read_cpuinfo_and_tolerate_its_absence(tmp_path: Path) -> None:
    assert isinstance(runtime.cpu_flags(), frozenset)
    assert runtime.cpu_flags(tmp_path / "no-such-file") == frozenset()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert runtime.cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16"})


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available; use device=cpu"):
            resolve_device(name)


def test_autocast_fp32_is_a_no_op_and_bf16_gives_bf16_matmuls() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="resolve_precision"):
        autocast(CPU, "auto")


def test_grad_scaler_only_for_fp16() -> None:
    assert isinstance(grad_scaler("fp16", CPU), torch.amp.GradScaler)
    assert grad_scaler("bf16", CPU) is None and grad_scaler("fp32", CPU) is None


def test_epoch_seeds_are_deterministic_and_differ_per_epoch() -> None:
    assert epoch_seed(1, 3) == epoch_seed(1, 3) == 100_006  # the value the demo's published numbers were drawn with
    seeds = [epoch_seed(seed, epoch) for seed in range(3) for epoch in range(60)]
    assert len(set(seeds)) == len(seeds)
    pids = list(range(50))
    orders = []
    for epoch in (0, 1, 0):
        sampler = build_train_sampler("random", pids, batch_size=8, seed=1)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    expected = torch.randperm(len(pids), generator=torch.Generator().manual_seed(epoch_seed(1, 1))).tolist()
    assert orders[1] == expected  # the sampler draws from runtime's epoch seed, nothing overwrites it


def test_compile_auto_is_off_everywhere_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="upperson.runtime"):
        assert runtime.resolve_compile("auto", CPU, "fp32") is False
        assert runtime.resolve_compile("auto", CPU, "bf16") is False
        assert runtime.resolve_compile("auto", CUDA, "bf16") is False
        assert runtime.resolve_compile("off", CPU, "fp32") is False
    assert "torch.compile auto -> off" in caplog.text


def test_compile_on_needs_a_cpp_compiler_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        runtime.resolve_compile("on", CPU, "fp32")
    assert runtime.resolve_compile("on", CUDA, "bf16") is True  # CUDA kernels come from Triton
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/" + name)
    assert runtime.resolve_compile("on", CPU, "fp32") is True
    with pytest.raises(ValueError, match="auto, on, off"):
        runtime.resolve_compile("yes", CPU, "fp32")


@pytest.mark.parametrize(
    ("cpu", "precision", "forced"),
    [
        (AVX2_ONLY | {"avx512f", "avx512_bf16"}, "bf16", True),
        (AVX2_ONLY | {"avx512f", "avx512_bf16"}, "fp32", False),
        (AVX2_ONLY | {"avx512_bf16", "amx_tile", "amx_bf16"}, "bf16", False),
        (AVX2_ONLY, "fp32", False),
    ],
    ids=["avx512-bf16", "avx512-fp32", "amx-bf16", "avx2-fp32"],
)
def test_training_attention_forces_math_only_where_it_measured_faster(
    monkeypatch: pytest.MonkeyPatch, cpu: frozenset[str], precision: str, forced: bool
) -> None:
    stub_hardware(monkeypatch, cpu=cpu)
    q = torch.randn(1, 2, 5, 8)
    with runtime.training_attention(CPU, precision):
        backends = torch._C._get_math_sdp_enabled(), torch._C._get_flash_sdp_enabled()
    assert backends == ((True, False) if forced else (True, True))
    with runtime.training_attention(CPU, precision):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # some kernel stays available
