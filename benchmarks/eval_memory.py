"""Benchmark ``retrieval_metrics`` against IRRA's full-argsort ``rank()`` at ICFG-PEDES size.

All paths score the same synthetic 19,848 x 19,848 text-to-image similarity (as ICFG-PEDES test:
19,848 captions and images, one caption per image, 1,000 identities, so ~20 positives per query).
Features are unit vectors around one random centre per identity, so the metrics are non-trivial.

    current:  ``upperson.evaluation.retrieval_metrics``: no sort of the gallery; each block of
              ``--chunk-size`` query rows is binned into cells, the items in cells without a
              positive counted from a histogram and only the few sharing a cell with a positive
              sorted;
    previous: the implementation it replaced, kept here for the comparison
              (:func:`previous_retrieval_metrics`): a stable sort of ``--chunk-size`` query rows at a
              time, only the positives' ranks kept;
    irra:     the steps of IRRA's ``rank()`` (spec B.12) written out: one argsort of the whole matrix,
              gathered pids, int64 cumulative sums, the per-query INP loop and the per-column
              precision loop. Skipped when its estimated peak does not fit in free memory.

Each path runs in a fresh subprocess that builds the matrix and then measures its first call's
memory, so nothing from another path or from building the matrix is counted (see :func:`measure`
and :data:`WORKER_ENV`), and the wall time of ``--repeat`` calls, of which the fastest is compared:
on a shared machine a burst of other work can slow a single call of a seconds-long path several
times over. The machine's load average before and after each path is reported too.

Run ``python benchmarks/eval_memory.py --help`` for options. The default takes a few minutes on a
2-core CPU, most of it in the IRRA path, which also needs ~14 GB of free memory (``--skip-irra``
leaves it out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from upperson.evaluation import retrieval_metrics

RESULT_MARKER = "RESULT_JSON "
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
IRRA_BYTES_PER_ENTRY = 34
"""IRRA's peak memory per similarity entry, for the skip check: measured 12,421 MiB (33 bytes) at
19,848², from int64 argsort indices and gathered pids (the latter alive until return), bool matches,
the int64 cumsum and three float32 [Nq, Ng] precision tensors (columns, stacked, masked)."""
MIB = 2**20
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""Pins glibc's mmap threshold at its initial 128 KiB. By default glibc raises it (up to 32 MiB)
after the first large free, after which the previous path's 20 MiB bool buffers come from the heap
and fragment it: its peak resident set then varied from 256 to 741 MiB between identical runs,
against a steady 236 MiB with the threshold pinned."""
PATHS = ("current", "previous", "irra")
CPU_FLAGS = ("avx2", "avx512_bf16", "amx_bf16")
"""The flags that decide bf16 matmul speed (see README.md), printed with every result."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=19_848, help="text queries (ICFG-PEDES test: 19,848)")
    parser.add_argument("--gallery", type=int, default=19_848, help="gallery images (ICFG-PEDES test: 19,848)")
    parser.add_argument("--ids", type=int, default=1_000, help="identities (ICFG-PEDES test: 1,000)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--noise", type=float, default=0.14, help="per-dimension feature noise around the identity centre")
    parser.add_argument("--chunk-size", type=int, default=1024, help="query rows at once (current and previous paths)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per path; the fastest is compared")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-irra", action="store_true", help="leave out the full-argsort path")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--worker", choices=PATHS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_similarity(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic ``[queries, gallery]`` cosine similarity and the pids of both sides."""
    generator = torch.Generator().manual_seed(0)
    gallery_pids = (torch.arange(args.gallery) % args.ids)[torch.randperm(args.gallery, generator=generator)]
    query_pids = gallery_pids[torch.arange(args.queries) % args.gallery]  # one caption per image, as ICFG
    centres = F.normalize(torch.randn(args.ids, args.dim, generator=generator), dim=1)
    images = F.normalize(centres[gallery_pids] + args.noise * torch.randn(args.gallery, args.dim, generator=generator), dim=1)
    texts = F.normalize(centres[query_pids] + args.noise * torch.randn(args.queries, args.dim, generator=generator), dim=1)
    similarity = texts.to(args.device) @ images.to(args.device).t()  # [queries, gallery]
    return similarity, query_pids.to(args.device), gallery_pids.to(args.device)


def previous_retrieval_metrics(
    similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    """The sort-based ``retrieval_metrics`` that the counting one replaced (input checks left out).

    Each chunk of query rows is stably sorted (values and int64 indices: ``(itemsize + 8)`` bytes per
    entry), the relevance mask gathered into rank order and only the positives' ranks kept.
    """
    parts = []
    for start in range(0, len(similarity), chunk_size):
        block, pids = similarity[start : start + chunk_size], query_pids[start : start + chunk_size]
        if torch.isnan(block).any():
            raise ValueError(f"similarity has NaN in query rows {start}..{start + len(block) - 1}")
        order = torch.sort(block, dim=1, descending=True, stable=True).indices  # [c, Ng]
        relevant = gallery_pids.unsqueeze(0) == pids.unsqueeze(1)  # [c, Ng] in gallery order
        matches = torch.gather(relevant, 1, order)  # [c, Ng] in rank order
        del order
        num_relevant = relevant.sum(1)
        rows, ranks = matches.nonzero(as_tuple=True)  # row-major: ranks ascend per row
        del matches, relevant
        row_start = torch.cumsum(num_relevant, 0) - num_relevant
        hits = torch.arange(1, len(ranks) + 1, device=ranks.device) - row_start[rows]
        precision_sum = torch.zeros(len(num_relevant), dtype=torch.float64, device=ranks.device)
        precision_sum.index_add_(0, rows, hits.double() / (ranks + 1).double())
        has_positive = num_relevant > 0
        first, last = torch.zeros_like(num_relevant), torch.zeros_like(num_relevant)
        first[has_positive] = ranks[row_start[has_positive]]
        last[has_positive] = ranks[row_start[has_positive] + num_relevant[has_positive] - 1]
        parts.append((first, last, num_relevant, precision_sum))
    first, last, num_relevant, precision_sum = (torch.cat(part) for part in zip(*parts))
    valid = num_relevant > 0
    relevant = num_relevant[valid].double()
    metrics = {f"R{k}": (first[valid] < k).double().mean().item() * 100 for k in (1, 5, 10)}
    metrics["mAP"] = (precision_sum[valid] / relevant).mean().item() * 100
    metrics["mINP"] = (relevant / (last[valid] + 1).double()).mean().item() * 100
    return metrics


def irra_rank(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> dict[str, float]:
    """IRRA's ``rank(max_rank=10, get_mAP=True)`` step by step, with its memory profile (spec B.12)."""
    indices = torch.argsort(similarity, dim=1, descending=True)  # [Nq, Ng] int64
    pred_labels = gallery_pids[indices]  # [Nq, Ng] int64, alive until return as in IRRA
    matches = pred_labels.eq(query_pids.view(-1, 1))  # [Nq, Ng] bool
    cmc = matches[:, :10].cumsum(1).clamp(max=1).float().mean(0) * 100
    num_rel = matches.sum(1)
    cumulative = matches.cumsum(1)  # [Nq, Ng] int64
    inp = [cumulative[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    minp = torch.cat(inp).mean() * 100
    columns = [cumulative[:, k] / (k + 1.0) for k in range(cumulative.shape[1])]  # Ng float32 columns
    del cumulative  # IRRA rebinds the name here, which frees the int64 cumsum after the list exists
    precision = torch.stack(columns, 1) * matches  # [Nq, Ng] float32
    average_precision = precision.sum(1) / num_rel
    return {
        "R1": cmc[0].item(),
        "R5": cmc[4].item(),
        "R10": cmc[9].item(),
        "mAP": average_precision.mean().item() * 100,
        "mINP": minp.item(),
    }


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run one path ``--repeat`` times in this (fresh) process: the wall time of each call and the
    peak memory of the first one above the matrix.

    CPU: tracemalloc does not see torch's allocations, so the kernel's accounting is used. Writing
    ``5`` to ``/proc/self/clear_refs`` resets the resident-set high-water mark (``VmHWM``) to the
    current resident set, which holds the similarity matrix; the peak is ``VmHWM`` after the call
    minus ``VmRSS`` before it. Where that reset is unavailable, the fallback is the growth of
    ``ru_maxrss`` over the call; it is exact only if building the matrix never held more than the
    matrix itself (the features are freed before the call, and the matmul result is the matrix), so
    it is flagged ``exact=False``. The workers run with a fixed glibc mmap threshold (see
    :data:`WORKER_ENV`), so every buffer of 128 KiB or more is mapped on allocation and unmapped on
    free, and the peak is the memory the path holds rather than what the allocator keeps.
    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
    """
    similarity, query_pids, gallery_pids = build_similarity(args)
    cuda = similarity.device.type == "cuda"
    gc.collect()
    exact = True
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            baseline = _proc_status_bytes("VmRSS")
        except OSError:
            exact = False
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    load_before = os.getloadavg()[0]
    seconds, peak = [], None
    for _ in range(args.repeat):
        start = time.perf_counter()
        if args.worker == "current":
            metrics = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=args.chunk_size)
        elif args.worker == "previous":
            metrics = previous_retrieval_metrics(similarity, query_pids, gallery_pids, args.chunk_size)
        else:
            metrics = irra_rank(similarity, query_pids, gallery_pids)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if peak is not None:
            continue
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        elif exact:
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": min(seconds),
        "all_seconds": seconds,
        "load": [load_before, os.getloadavg()[0]],
        "peak_bytes": peak - baseline,
        "matrix_bytes": similarity.numel() * similarity.element_size(),
        "exact": exact,
        "metrics": {key: float(metrics[key]) for key in METRIC_KEYS},  # exact: JSON round-trips floats
    }


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def run_worker(path: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", path]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ | WORKER_ENV)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{path} worker failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


def cpu_flags() -> str:
    """The :data:`CPU_FLAGS` this CPU has (``grep -o 'avx512_bf16\\|amx_bf16\\|avx2' /proc/cpuinfo``)."""
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return " ".join(flag for flag in CPU_FLAGS if flag in present) or "none of " + ", ".join(CPU_FLAGS)


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], skipped: str | None) -> str:
    labels = {
        "current": f"`retrieval_metrics`: cell counts, no sort (chunk {args.chunk_size})",
        "previous": f"previous: stable sort per chunk (chunk {args.chunk_size})",
        "irra": "IRRA `rank()` (full argsort)",
    }
    lines = [
        f"{args.queries:,} x {args.gallery:,} similarity, {args.ids:,} ids, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"CPU flags: {cpu_flags()}",
        f"matrix itself: {results['current']['matrix_bytes'] / MIB:,.0f} MiB (not counted below); "
        f"workers run with {' '.join(f'{k}={v}' for k, v in WORKER_ENV.items())}",
        "",
        "| path | wall s (fastest) | all calls s | peak extra memory MiB | load avg before → after "
        "| R1 | R5 | R10 | mAP | mINP |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for path, result in results.items():
        m = result["metrics"]
        flag = "" if result["exact"] else " (ru_maxrss)"
        lines.append(
            f"| {labels[path]} | {result['seconds']:.1f} | {' '.join(f'{t:.1f}' for t in result['all_seconds'])} | "
            f"{result['peak_bytes'] / MIB:,.0f}{flag} | "
            f"{result['load'][0]:.1f} → {result['load'][1]:.1f} | "
            + " | ".join(f"{m[key]:.3f}" for key in METRIC_KEYS)
            + " |"
        )
    current, previous = results["current"], results["previous"]
    same = current["metrics"] == previous["metrics"]
    lines += [
        "",
        "| ratio | wall time | peak extra memory |",
        "|---|---:|---:|",
        f"| current / previous | {current['seconds'] / previous['seconds']:.3f}x | "
        f"{current['peak_bytes'] / previous['peak_bytes']:.3f}x |",
    ]
    if "irra" in results:
        irra = results["irra"]
        for path in ("current", "previous"):
            lines.append(
                f"| {path} / IRRA | {results[path]['seconds'] / irra['seconds']:.3f}x | "
                f"{results[path]['peak_bytes'] / irra['peak_bytes']:.3f}x |"
            )
        difference = max(abs(current["metrics"][key] - irra["metrics"][key]) for key in METRIC_KEYS)
        lines += ["", f"largest metric difference, current vs IRRA: {difference:.2e} percentage points"]
    else:
        lines += ["", f"IRRA path skipped: {skipped}"]
    lines.append(f"current vs previous metrics: {'bit-identical' if same else 'DIFFERENT'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_MARKER + json.dumps(measure(args)), flush=True)
        return
    results = {path: run_worker(path, argv) for path in ("current", "previous")}
    skipped = "--skip-irra" if args.skip_irra else None
    needed = (IRRA_BYTES_PER_ENTRY + 4) * args.queries * args.gallery  # + the float32 matrix itself
    if skipped is None and needed > 0.9 * available_bytes(args.device):
        skipped = f"needs ~{needed / 2**30:.1f} GiB, {available_bytes(args.device) / 2**30:.1f} GiB available"
    if skipped is None:
        results["irra"] = run_worker("irra", argv)
    print(report(args, results, skipped))
    if args.json is not None:
        arguments = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": arguments, "cpu_flags": cpu_flags(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
