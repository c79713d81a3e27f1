"""``benchmarks/gpu_check.py --smoke``: the GPU kit's code paths on the CPU, on every commit.

The GPU run happens rarely and must work the first time; the smoke run takes the same paths (the
cuda-marked tests through pytest and JUnit, every training path, evaluation, a torch.compile
subprocess, the report) with the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

SMOKE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("gpu-check")
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out), "--time-budget-s", "600"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False)
    return out, done


def test_smoke_run_writes_the_report_with_sane_numbers(smoke: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    expected = {"schema", "mode", "setup", "machine", "tests", "train", "evaluation", "compile", "ratios", "targets", "skipped", "failed", "wall_s"}
    assert expected <= report.keys()
    assert report["mode"] == "smoke" and report["skipped"] == report["failed"] == [] and report["error"] is None
    assert report["setup"]["device"] == "cpu" and report["setup"]["epoch_pairs"] == 68_126
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu_count"] >= 1
    assert set(machine["cpu_flags_of_note"]) <= set(machine["cpu_flags"])

    tests = report["tests"]
    assert tests["status"] == "exit 0" and tests["failed"] == tests["error"] == 0 and tests["cases"]
    if not torch.cuda.is_available():
        assert tests["skipped"] == len(tests["cases"])
        assert {case["message"] for case in tests["cases"]} == {"needs CUDA"}

    rows = {(row["path"], row["batch_size"]) for row in report["train"]}
    assert rows == {("a", 4), ("b", 4), ("c", 4)}
    for row in report["train"]:
        assert row["images_per_s"] > 0 and row["step_s_median"] > 0 and row["epoch_s"] > 0
        assert row["peak_bytes"] > 0 and row["step_bytes"] >= 0 and len(row["step_s"]) == 2
    assert report["evaluation"]["images_per_s"] > 0 and report["evaluation"]["texts_per_s"] > 0
    compiled = report["compile"]
    assert compiled["status"] == "ok", compiled
    assert compiled["backend"] == "eager" and compiled["compile_s"] >= 0 and compiled["speedup_vs_eager"] > 0
    assert [target["verdict"] for target in report["targets"]] != ["not measured"] * 2
    assert all(value is not None and value > 0 for value in report["ratios"].values())


def test_smoke_markdown_has_every_section(smoke: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = smoke
    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## Machine", "## Correctness on CUDA", "## Training step", "## Targets", "## Evaluation", "## torch.compile"):
        assert heading in markdown
    assert "| CPU flags |" in markdown and "| (a) default" in markdown and "| (c) official-style" in markdown
    assert markdown in done.stdout  # printed at the end as well
    assert (out / "cuda_tests.xml").is_file() and (out / "cuda_tests.log").is_file()


def test_junit_summary_reads_outcomes_messages_and_measured_errors(tmp_path: Path) -> None:
    """The parser against the XML pytest writes (xunit1 keeps record_property)."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_passes(record_property):
            record_property("relative error", "0.004")

        def test_fails():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="needs CUDA")
        def test_skipped():
            pass
    """))
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_sample.py"), f"--junitxml={junit}",
         "-o", "junit_family=xunit1", "--rootdir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    cases = {case["name"]: case for case in gpu_check.parse_junit(junit)["cases"]}
    assert cases["test_passes"]["outcome"] == "passed" and cases["test_passes"]["properties"] == {"relative error": "0.004"}
    assert cases["test_fails"]["outcome"] == "failed" and "one is not two" in cases["test_fails"]["message"]
    assert cases["test_skipped"]["outcome"] == "skipped" and cases["test_skipped"]["message"] == "needs CUDA"


def test_plan_measures_the_targets_rows_first_and_compiles_last() -> None:
    setup = gpu_check.Setup(
        smoke=False, device=torch.device("cuda"), backbone="ViT-B-16-quickgelu", image_size=(384, 128), batch_sizes=(64, 128),
        eval_batch_size=256, steps=10, warmup=3, compile_backend="inductor", measure_cap_s=20.0,
    )
    assert [item.name for item in gpu_check.plan(setup)] == [
        "train (a) batch 128", "train (c) batch 128", "train (b) batch 128", "eval", "train (c-fp32) batch 128",
        "train (a) batch 64", "train (c) batch 64", "train (b) batch 64", "train (c-fp32) batch 64", "compile (a) batch 128",
    ]
    paths = gpu_check.speed_paths(torch.device("cuda"))
    assert paths["c"].half_model and paths["c"].attention_backend == "explicit" and paths["a"].precision == "auto"
    assert not any(path.half_model for path in gpu_check.speed_paths(torch.device("cpu")).values())
