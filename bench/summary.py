"""Every figure issue 19 set a target for, next to its target: read from the newest bench/results/*.json
of each device (written by the benchmarks `make bench` runs). A figure no result file has yet is shown
as "not run" (the GPU ones need a CUDA machine: bench/pretrain_gpu.py, bench/targets.py there).

    python bench/summary.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (benchmark, key in its results, what it is, target: (">=" | "<=", value), devices: "cpu" | "cuda")
FIGURES = (
    ("loader", "ratio_zarr_vs_decord_workers_0", "loader: Zarr / decord-per-step, in-process", (">=", 5.0),
     "cpu"),
    ("loader", "ratio_zarr_vs_decord_workers_2", "loader: Zarr / decord-per-step, 2 workers", (">=", 5.0),
     "cpu"),
    ("loader", "zarr_speedup_vs_workers_0_workers_2", "loader: Zarr 2 workers / in-process", (">=", 1.0),
     "cpu"),
    ("decode", "ratio_stage_1_worker_vs_bare", "decode: stage / bare decord, 1 worker", (">=", 0.9), "cpu"),
    ("decode", "speedup_workers_2", "decode: 2 workers / 1 worker", (">=", 1.8), "cpu"),
    ("targets", "ratio_stage_vs_bare", "targets: stage / bare encoder", (">=", 0.9), "cpu"),
    ("targets", "predicted_ratio_cuda-NVIDIA_H100_80GB_HBM3", "targets: H100 stage / bare, predicted on CPU",
     (">=", 0.8), "cpu"),
    ("targets", "ratio_stage_vs_bare", "targets: stage / bare encoder", (">=", 0.8), "cuda"),
    ("pretrain_cpu", "ratio_stage_vs_bare_median", "pretrain: stage / bare step", (">=", 0.95), "cpu"),
    ("pretrain_gpu", "ratio_stage_vs_bare", "pretrain: stage / bare step, ViT-B", (">=", 0.95), "cuda"),
)


def results_by_device(results: Path, bench: str, kind: str) -> dict[str, dict]:
    """{device: results} of one benchmark on devices of `kind` (one file per device)."""
    found = {}
    for path in sorted(results.glob(f"{bench}-{kind}*.json")):
        found[path.stem[len(bench) + 1:]] = json.loads(path.read_text())
    return found


def rows(results: Path) -> list[tuple[str, str, str, str, str]]:
    table = []
    for bench, key, what, (sense, target), kind in FIGURES:
        runs = {device: data[key] for device, data in results_by_device(results, bench, kind).items()
                if key in data}
        if not runs:
            table.append((what, kind, "not run", f"{sense} {target:g}", ""))
        for device, value in runs.items():
            met = value >= target if sense == ">=" else value <= target
            table.append((what, device, f"{value:.3g}", f"{sense} {target:g}", "met" if met else "NOT met"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    table = rows(args.results)
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    print("figure".ljust(widths[0]), "device".ljust(widths[1]), "value".rjust(widths[2]), "target", "")
    for row in table:
        print(row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
              row[3].ljust(widths[3]), row[4])


if __name__ == "__main__":
    main()
