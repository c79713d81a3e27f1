"""Latency of `upperson serve` text queries against 100k- and 1M-row indexes on this CPU, and what
swapping adapters costs.

1. **Adapter swaps** (in this process, ViT-B/16 UP-Person text encoder, random weights): one text
   query encoded with LoRA as a side branch (what the server does) and merged into the frozen
   weights; the cost of a swap by copying the adapter tensors (the server) and by unmerge → copy →
   merge; and how far the frozen in-projections drift from their original values after 100 merged
   swaps between two adapters (why the server never merges: its models share those tensors).
2. **HTTP**: the real server (``python -m upperson serve``, uvicorn) in a subprocess serving two
   scenarios on one random ViT-B/16 UP-Person model: 100k and 1M rows of random unit float16
   features of 512 dimensions (as the index stores them; no image is encoded). httpx clients send
   ``POST /api/search`` with varied descriptions, one at a time (concurrency 1) and from 8 threads
   at once (concurrency 8). Latency is client-side (request sent → response parsed), p50/p95;
   requests/s is completed requests over the wall time; ``took_ms`` is the server's own time
   (encode + rank). Each server setting of ``--threads`` is a separate server process.

    python benchmarks/serve.py                     # about 5 minutes on 2 CPU cores, ~4 GB of memory
    python benchmarks/serve.py --threads 1 --requests 20 --json serve.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from serve_fixtures import IMAGE_SIZE, describe_cpu, random_adapters, random_index, vit_b16_checkpoint, write_json
from upperson.retrieval.gallery import encode_queries
from upperson.retrieval.scenarios import Adapter, SharedModel

QUERIES = [
    "a woman in a red coat carrying a black backpack",
    "a man with a blue backpack and grey trousers",
    "a young man in a black jacket, blue jeans and white sneakers",
    "a girl with long hair wearing a white dress and sandals",
    "an older man in a brown suit holding an umbrella",
    "a woman wearing a green t-shirt, black shorts and a cap",
    "a man in a striped shirt pulling a suitcase",
    "a woman with a yellow handbag, a grey coat and boots",
    "a boy in a red hoodie riding a bicycle",
    "a person in a dark blue uniform with a white helmet",
    "a woman in black leggings and a pink jacket jogging",
    "a man with glasses, a beard, a plaid shirt and khaki pants",
]
ROWS = (100_000, 1_000_000)
TARGET_P50_MS = {100_000: 100.0, 1_000_000: 400.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per scenario at concurrency 1 (8: 2x as many)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="server torch threads, one server each (default: 1 2)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint, adapter and indexes here (default: a temporary folder)")
    parser.add_argument("--skip-swaps", action="store_true", help="leave out part 1")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def _median_ms(function: Any, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``function()`` (CPU time = what an idle core would take, at 1 thread)."""
    function()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall) * 1000, statistics.median(cpu) * 1000


def measure_swaps(checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """Part 1 (one torch thread): side branch vs merged, per query and per swap, and the drift of merged swaps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_swaps(checkpoint, workdir)
    finally:
        torch.set_num_threads(threads)


def _measure_swaps(checkpoint: Path, workdir: Path) -> dict[str, Any]:
    model, adapters = random_adapters(workdir / "swap-adapters", checkpoint, 2)
    from upperson.adapter_file import read_adapter_for

    first, second = (Adapter(path, None, read_adapter_for(model, path)[0]) for path in adapters)
    shared = SharedModel(model, key=None, device=torch.device("cpu"))  # type: ignore[arg-type]
    original = {name: tensor.clone() for name, tensor in model.backbone_state_dict().items() if name.endswith("in_proj_weight")}
    cpu = torch.device("cpu")
    query = [QUERIES[0]]
    with shared.using(first):
        side_ms = _median_ms(lambda: encode_queries(model, query, cpu), 7)
    flip = iter([first, second] * 1000)

    def copy_swap() -> None:
        with shared.using(next(flip)):
            pass

    copy_ms = _median_ms(copy_swap, 9)[0]
    targets = model.trainable_state_dict()

    def merged_swap(adapter: Adapter) -> None:
        model.unmerge_lora()
        with torch.no_grad():
            for name, tensor in adapter.tensors.items():
                targets[name].copy_(tensor)
        model.merge_lora()

    with torch.inference_mode():
        with shared.using(first):
            reference = encode_queries(model, query, cpu)
            model.merge_lora()
            merged_ms = _median_ms(lambda: encode_queries(model, query, cpu), 7)
            merged_swap_ms = _median_ms(lambda: merged_swap(next(flip)), 9)[0]
            for number in range(100):
                merged_swap((first, second)[number % 2])
            merged_swap(first)
            model.unmerge_lora()
            drift = max((model.backbone_state_dict()[name] - weight).abs().max().item() for name, weight in original.items())
            drifted = encode_queries(model, query, cpu)
    return {
        "side_branch_query_ms": side_ms,
        "merged_query_ms": merged_ms,
        "copy_swap_ms": copy_ms,
        "merged_swap_ms": merged_swap_ms,
        "drift_after_100_merged_swaps": drift,
        "feature_change_after_100_merged_swaps": (drifted - reference).abs().max().item(),
    }


def prepare(workdir: Path) -> Path:
    """The checkpoint, one adapter and the two indexes; returns the scenario file for ``upperson serve``."""
    checkpoint = vit_b16_checkpoint(workdir)
    model, (adapter,) = random_adapters(workdir, checkpoint, 1)
    lines = []
    for rows in ROWS:
        out = workdir / f"index-{rows}"
        if not (out / "index.json").is_file():
            print(f"writing a {rows:,}-row index ...", file=sys.stderr)
            random_index(out, model, adapter, rows, seed=rows)
        lines.append(f"- {{name: rows-{rows}, index: {out}}}")
    scenarios = workdir / "serve.yaml"
    scenarios.write_text("\n".join(lines) + "\n")
    return scenarios


class Server:
    """``python -m upperson serve`` in a subprocess on a free port."""

    def __init__(self, scenarios: Path, threads: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "upperson", "serve", "--config", str(scenarios), "--port", str(self.port),
            "--device", "cpu", "--threads", str(threads),
        ]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ | {"UPPERSON_TOKEN": ""})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"upperson serve exited ({self.process.returncode}):\n{self.log.read().decode()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("upperson serve did not answer within 10 minutes")
            time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def load(url: str, scenario: str, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` text searches from ``concurrency`` threads; client latency, server time, errors."""
    local = threading.local()
    latencies: list[float] = []
    took: list[float] = []
    errors: list[str] = []

    def one(number: int) -> None:
        client = getattr(local, "client", None) or httpx.Client(base_url=url, timeout=120)
        local.client = client
        body = {"scenario": scenario, "query": QUERIES[number % len(QUERIES)], "top_k": 10}
        started = time.perf_counter()
        try:
            response = client.post("/api/search", json=body)
            payload = response.json()
        except (httpx.HTTPError, ValueError) as error:
            errors.append(f"{type(error).__name__}: {error}")
            return
        latencies.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200 or len(payload.get("hits", [])) != 10:
            errors.append(f"{response.status_code}: {payload}")
        else:
            took.append(payload["took_ms"])

    for number in range(3):  # warm-up
        one(number)
    latencies.clear()
    took.clear()
    errors.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "requests": requests,
        "concurrency": concurrency,
        "p50_ms": statistics.median(latencies),
        "p95_ms": quantiles[18],
        "requests_per_s": len(latencies) / wall,
        "server_p50_ms": statistics.median(took) if took else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"


def report(swaps: dict[str, Any] | None, results: list[dict[str, Any]]) -> str:
    lines = [f"torch {torch.__version__}; {describe_cpu()}", ""]
    if swaps:
        lines += [
            "| ViT-B/16 UP-Person, one text query, 1 thread | LoRA side branch (serve) | LoRA merged |",
            "|---|---:|---:|",
            f"| encode ms, wall (median of 7) | {swaps['side_branch_query_ms'][0]:.1f} | {swaps['merged_query_ms'][0]:.1f} |",
            f"| encode ms, CPU time | {swaps['side_branch_query_ms'][1]:.1f} | {swaps['merged_query_ms'][1]:.1f} |",
            f"| adapter swap ms (median of 9) | {swaps['copy_swap_ms']:.1f} (copy tensors) | {swaps['merged_swap_ms']:.1f} (unmerge, copy, merge) |",
            f"| frozen in-projection drift after 100 swaps | 0 (never written) | {swaps['drift_after_100_merged_swaps']:.2e} |",
            f"| text feature change after 100 swaps | 0 | {swaps['feature_change_after_100_merged_swaps']:.2e} |",
            "",
        ]
    lines += [
        "| index rows | server threads | concurrency | requests | p50 ms | p95 ms | requests/s | server took_ms p50 | errors | target p50 (concurrency 1) | load avg before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for result in results:
        target = ""
        if result["concurrency"] == 1:
            limit = TARGET_P50_MS[result["rows"]]
            target = f"≤ {limit:.0f}: {'pass' if result['p50_ms'] <= limit else 'FAIL'}"
        lines.append(
            f"| {result['rows']:,} | {result['threads']} | {result['concurrency']} | {result['requests']} | {result['p50_ms']:.0f} | "
            f"{result['p95_ms']:.0f} | {result['requests_per_s']:.2f} | {result['server_p50_ms']:.0f} | {result['errors']} | {target} | "
            f"{result['loadavg']} |"
        )
    failures = [result["first_error"] for result in results if result["errors"]]
    if failures:
        lines += ["", f"first error: {failures[0]}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="upperson-serve-bench-") as temporary:
        workdir = (args.workdir or Path(temporary)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        scenarios = prepare(workdir)
        swaps: dict[str, Any] | None = None
        if not args.skip_swaps:
            print("measuring adapter swaps ...", file=sys.stderr)
            swaps = measure_swaps(vit_b16_checkpoint(workdir), workdir)
        results = []
        for threads in args.threads:
            print(f"starting upperson serve with {threads} thread(s) ...", file=sys.stderr)
            server = Server(scenarios, threads)
            try:
                for rows in ROWS:
                    for concurrency, requests in ((1, args.requests), (8, 2 * args.requests)):
                        print(f"  {rows:,} rows, concurrency {concurrency} ...", file=sys.stderr)
                        before = loadavg()
                        result = load(server.url, f"rows-{rows}", requests, concurrency)
                        results.append({**result, "rows": rows, "threads": threads, "loadavg": before})
            finally:
                server.close()
    print(report(swaps, results))
    write_json(args.json, {"cpu": describe_cpu(), "image_size": IMAGE_SIZE, "swaps": swaps, "results": results})


if __name__ == "__main__":
    main()
