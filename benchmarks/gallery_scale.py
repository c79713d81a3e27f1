"""Gallery search at scale on CPU: exact (FAISS flat, torch matmul) against HNSW, IVF-Flat and IVF-PQ.

The gallery is synthetic but clustered, the way person features are: ``C = rows / 50`` identity
centres are drawn from a standard Gaussian in ``dim`` dimensions and L2-normalised; each gallery row
is its identity's centre plus Gaussian noise of relative scale ``--row-noise`` (noise vector of
expected norm ``row_noise`` times the unit centre's, i.e. ``N(0, row_noise**2 / dim)`` per
coordinate), L2-normalised, stored in float16 as the gallery keeps its features. Identities are
drawn uniformly per row (seeded ``numpy`` generator). Queries are drawn the same way from the same
centres with their own noise (``--query-noise``), as text features of the same people would be.
Uniform random unit vectors would be the worst case for every ANN index and unlike real features.

Every index is built from the float16 rows upcast to float32 (what ``upperson`` hands FAISS), so the
exact top-10 over the stored rows is the reference. Each ANN setting takes ``R = 4 * k`` candidates
and re-scores them exactly against the float16 rows (the gallery's own copy) before its final top-k;
the timed single query includes that re-scoring. Latency: one query at a time,
``faiss.omp_set_num_threads(1)`` and one torch thread, p50/p95 over ``--queries`` queries. Builds
use ``--build-threads`` (default: every CPU). Memory: growth of ``VmRSS`` while building each index
(each index is freed before the next); size: ``faiss.write_index`` to a temporary directory.

    nice -n 10 python benchmarks/gallery_scale.py --json gallery_scale.json            # 1M rows, ~15 min on 2 cores
    nice -n 10 python benchmarks/gallery_scale.py --rows 1000000 10000000 --json out.json   # 10M needs ~45 GB
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from upperson.retrieval.gallery import _rank_torch

MIB = 2**20
ROWS_PER_IDENTITY = 50
CHUNK = 1 << 16
"""Rows generated at a time (bounded float32 temporaries)."""


def describe_cpu() -> dict[str, Any]:
    """CPU model, logical CPUs and the flags that decide matrix-product speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
    return {"model": name, "logical_cpus": os.cpu_count(), "flags": {flag: flag in flags for flag in wanted}}


def rss_bytes() -> int:
    """Resident set size of this process (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def release_memory() -> None:
    """Hand freed heap pages back to the OS so the next RSS delta starts from what is really held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float) -> np.ndarray:
    """``[count, D]`` float32 unit rows: a uniformly drawn centre plus relative Gaussian noise."""
    dim = centres.shape[1]
    ids = rng.integers(0, centres.shape[0], size=count)
    rows = centres[ids] + rng.standard_normal((count, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    return unit(rows).astype(np.float32)


def make_gallery(rows: int, dim: int, queries: int, row_noise: float, query_noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Float16 gallery ``[rows, D]`` and float32 queries ``[queries, D]`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, rows // ROWS_PER_IDENTITY), dim), dtype=np.float32))
    gallery = torch.empty(rows, dim, dtype=torch.float16)
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        gallery[start:stop] = torch.from_numpy(clustered(rng, centres, stop - start, row_noise))
    return gallery, clustered(rng, centres, queries, query_noise)


def rescore(query: torch.Tensor, gallery: torch.Tensor, candidates: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` of ``candidates`` by exact inner product with the float16 rows (``-1`` = no candidate)."""
    candidates = candidates[candidates >= 0]
    ids = torch.from_numpy(candidates).long()
    scores = gallery[ids].float() @ query  # [R]
    return candidates[scores.topk(min(k, len(candidates))).indices.numpy()]


def time_queries(search: Callable[[int], np.ndarray], count: int) -> tuple[list[float], list[np.ndarray]]:
    """Seconds and results of ``search(i)`` for each query, one at a time."""
    seconds, results = [], []
    for i in range(count):
        start = time.perf_counter()
        results.append(search(i))
        seconds.append(time.perf_counter() - start)
    return seconds, results


def recall(results: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(found[:k].tolist()) & set(true[:k].tolist())) / k for found, true in zip(results, truth)]))


def index_bytes(index: Any) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def row(method: str, setting: str, seconds: list[float], results: list[np.ndarray], truth: np.ndarray, k: int, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "setting": setting,
        f"recall@{k}": recall(results, truth, k),
        "p50_ms": 1000 * statistics.median(seconds),
        "p95_ms": 1000 * percentile(seconds, 95),
        **extra,
    }


def build(make: Callable[[], Any], build_threads: int) -> tuple[Any, float, int]:
    """``make()`` with ``build_threads`` threads: the index, build seconds and RSS growth."""
    release_memory()
    before = rss_bytes()
    faiss.omp_set_num_threads(build_threads)
    start = time.perf_counter()
    index = make()
    seconds = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    return index, seconds, rss_bytes() - before


def measure(rows: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    k, candidates = args.k, 4 * args.k
    start = time.perf_counter()
    gallery, queries = make_gallery(rows, args.dim, args.queries, args.row_noise, args.query_noise, args.seed)
    print(f"[{rows:,} rows] generated in {time.perf_counter() - start:.1f} s", flush=True)
    query_tensors = torch.from_numpy(queries)
    torch.set_num_threads(args.build_threads)
    _, truth = _rank_torch(query_tensors, gallery, k)  # exact over the float16 rows, all queries at once
    truth = truth.numpy()
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    common = {"rows": rows}

    def report(entry: dict[str, Any]) -> None:
        results.append(entry)
        print(f"[{rows:,} rows] {entry['method']} {entry['setting']}: recall@{k} {entry[f'recall@{k}']:.3f}, "
              f"p50 {entry['p50_ms']:.2f} ms, p95 {entry['p95_ms']:.2f} ms", flush=True)

    # Exact, our current torch path: float16 rows converted block by block, one query at a time.
    seconds, found = time_queries(lambda i: _rank_torch(query_tensors[i : i + 1], gallery, k)[1][0].numpy(), args.queries)
    report(row("exact torch fp16 matmul", "-", seconds, found, truth, k, build_s=0.0,
               rss_mib=gallery.numel() * gallery.element_size() / MIB, index_mib=gallery.numel() * 2 / MIB, **common))

    # FAISS inputs: the float16 rows upcast, exactly the values the gallery stores.
    data = gallery.float().numpy()
    dim = data.shape[1]

    def ann_sweep(method: str, index: Any, build_s: float, rss: int, knob: str, values: list[int], extra: dict[str, Any]) -> None:
        size = index_bytes(index)
        for value in values:
            if knob == "efSearch":
                index.hnsw.efSearch = value
            elif knob == "nprobe":
                index.nprobe = value
            fetch = candidates if knob else k

            def search(i: int) -> np.ndarray:
                _, ids = index.search(queries[i : i + 1], fetch)
                return rescore(query_tensors[i], gallery, ids[0], k) if knob else ids[0]

            seconds, found = time_queries(search, args.queries)
            report(row(method, f"{knob}={value}" if knob else "-", seconds, found, truth, k, build_s=build_s,
                       rss_mib=rss / MIB, index_mib=size / MIB, **extra, **common))

    def flat() -> Any:
        index = faiss.IndexFlatIP(dim)
        index.add(data)
        return index

    index, build_s, rss = build(flat, args.build_threads)
    ann_sweep("exact FAISS IndexFlatIP", index, build_s, rss, "", [0], {})
    del index

    if "hnsw" in args.methods:
        def hnsw() -> Any:
            index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = args.ef_construction
            index.add(data)
            return index

        index, build_s, rss = build(hnsw, args.build_threads)
        print(f"[{rows:,} rows] HNSW built in {build_s:.1f} s", flush=True)
        ann_sweep(f"HNSW M={args.hnsw_m} efC={args.ef_construction} + rescore R={candidates}", index, build_s, rss,
                  "efSearch", args.ef_search, {})
        del index

    nlist = max(1, round(4 * np.sqrt(rows)))
    sample = data[np.random.default_rng(args.seed + 1).choice(rows, size=min(rows, args.train_per_list * nlist), replace=False)]
    quantizer = faiss.IndexFlatIP(dim)

    def train_quantizer() -> Any:
        trainer = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        trainer.cp.niter = args.kmeans_iterations
        trainer.train(sample)
        return trainer

    _, quantizer_s, _ = build(train_quantizer, args.build_threads)
    print(f"[{rows:,} rows] IVF quantizer ({nlist} lists, {len(sample):,} training rows) trained in {quantizer_s:.1f} s", flush=True)

    if "ivf-flat" in args.methods:
        def ivf_flat() -> Any:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.add(data)  # the quantizer is trained: only the rows are assigned
            return index

        index, build_s, rss = build(ivf_flat, args.build_threads)
        ann_sweep(f"IVF-Flat nlist={nlist} + rescore R={candidates}", index, quantizer_s + build_s, rss, "nprobe",
                  args.nprobe, {"quantizer_train_s": quantizer_s})
        del index

    if "ivf-pq" in args.methods:
        def ivf_pq() -> Any:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.train(sample)  # the shared quantizer is trained already: only the product quantizer
            index.add(data)
            return index

        index, build_s, rss = build(ivf_pq, args.build_threads)
        ann_sweep(f"IVF-PQ nlist={nlist} m={args.pq_m}x8 + rescore R={candidates}", index, quantizer_s + build_s, rss,
                  "nprobe", args.nprobe, {"quantizer_train_s": quantizer_s})
        del index
    return results


def markdown(results: list[dict[str, Any]], k: int) -> str:
    lines = [
        f"| rows | method | setting | recall@{k} | p50 ms | p95 ms | build s | RSS growth MiB | index on disk MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results:
        lines.append(
            f"| {entry['rows']:,} | {entry['method']} | {entry['setting']} | {entry[f'recall@{k}']:.3f} | {entry['p50_ms']:.2f} | "
            f"{entry['p95_ms']:.2f} | {entry['build_s']:.1f} | {entry['rss_mib']:,.0f} | {entry['index_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="gallery sizes, run in turn")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--row-noise", type=float, default=0.75, help="relative noise of a gallery row around its centre")
    parser.add_argument("--query-noise", type=float, default=1.0, help="relative noise of a query around its centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["hnsw", "ivf-flat", "ivf-pq"], choices=["hnsw", "ivf-flat", "ivf-pq"])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--train-per-list", type=int, default=40, help="IVF training rows per list (a random sample)")
    parser.add_argument("--kmeans-iterations", type=int, default=10)
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cpu = describe_cpu()
    load_before = os.getloadavg()
    print(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, flags: "
          + " ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in cpu["flags"].items()))
    print(f"load average before: {' '.join(f'{value:.2f}' for value in load_before)}; faiss {faiss.__version__}, torch {torch.__version__}", flush=True)
    results = [entry for rows in args.rows for entry in measure(rows, args)]
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{value:.2f}' for value in load_after)}")
    print(markdown(results, args.k))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "cpu": cpu, "load_average_before": load_before, "load_average_after": load_after,
            "faiss": faiss.__version__, "torch": torch.__version__, "arguments": {key: str(value) for key, value in vars(args).items()},
            "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
