"""Run the benchmarks and write the results: ``python -m bench.run [--only NAME ...] [--smoke]``.

Sections (``SECTIONS`` of bench/results.py, which holds their titles):

- ``resnet``: API job vs the floor (bench/resnet_job.py), ResNet-50 SavedModel, ``--repeats`` (default 2).
- ``digits``: accuracy after pruning through the API (bench/digits_quality.py).
- ``tfmot``: quality vs tfmot at 50-95% sparsity, 3 and 10 epochs, 3 seeds, plus zip sizes and the plot
  ``bench/plots/tfmot_quality.png`` (bench/tfmot_quality.py; tfmot itself runs in bench/tfmot_side.py).
- ``throughput``: our fine-tuning loop vs Keras ``model.fit`` (bench/finetune_throughput.py).
- ``service``: ``GET /v1/jobs/{id}`` latency under 50 and 200 clients, 1 GiB upload throughput and API memory
  (bench/service_load.py).
- ``search``: the accuracy-budget search vs a grid of single jobs at 5% steps (bench/search.py).
- ``compaction``: channel pruning + physical removal of ResNet-50 / MobileNetV2 at 30/50/70% of channels vs the
  dense upload (params, bytes, MACs, latency at batch 1 and 8), digits CNN vs unstructured at the same
  parameter count (bench/compaction.py).
- ``datasets``: issue 20, a streamed TFRecord dataset through the job pipeline vs bare Keras ``fit`` /
  ``predict`` on the same shards, the same job with its shards on S3 vs local, and Fashion-MNIST as ``.npz`` /
  TFRecord / PNG folder through one recommended job (bench/datasets.py).
- ``structure``: issue 22 (a)-(e), a small ViT trained on Fashion-MNIST with 50% of heads and MLP width removed,
  a KerasHub BERT encoder, an LSTM classifier, MACs and latency budgets on ResNet-50 and the ViT, and ONNX
  Runtime latency of the compacted models (bench/structure.py).
- ``exports``: zipped bytes and accuracy of the dense / pruned SavedModel and every TFLite file of the digits
  CNN at 80% (and 50% channels, compacted) (bench/exports.py).
- ``calibration``: issue 21, one-shot pruning from calibration data alone: ``wanda`` / ``sparsegpt`` vs
  magnitude on a char-level transformer LM (perplexity) and the Fashion-MNIST CNN (accuracy), channel repair
  (``reconstruct``) one-shot and before fine-tuning, and the cost of ``sparsegpt`` on ResNet-50
  (bench/calibration.py, the LM in bench/charlm.py).

Opt-in (``OPT_IN``, run only when named in ``--only``; many minutes, tens of GB of disk and RAM):

- ``bigmodel``: issue 14 (b), a ~1 B-parameter plain ``tf.Module`` SavedModel (~4 GB) uploaded, pruned and
  downloaded through the API on S3 vs a bare-TensorFlow load+prune+save+zip (bench/big_model.py).
- ``datasets_memory``: issue 20 (a), worker peak RSS of one streamed job on a ~1 GB and a >= 30 GB TFRecord
  dataset (needs 40 GB free disk), plus one full streamed pass over the large one (bench/datasets.py).

``bench/RESULTS.md`` is edited section by section (bench/results.py); ``--smoke`` runs tiny stand-ins through the
same code paths (real server subprocess, real HTTP, real tfmot and floor subprocesses) and writes a fresh
``bench/out/RESULTS.smoke.md`` instead, never ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.results import ALL_SECTIONS, SECTIONS, write_results

# runner(smoke, repeats, cache_dir, work_dir); each imports its module lazily (--help needs none of them).
Runner = Callable[[bool, int | None, Path | None, Path | None], dict[str, Any]]


def _resnet(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.resnet_job import run_resnet

    return run_resnet(smoke=smoke, repeats=repeats, cache_dir=cache_dir, work_dir=work_dir)


def _digits(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.digits_quality import run_digits

    return run_digits(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _tfmot(smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None) -> dict[str, Any]:
    from bench.tfmot_quality import run_tfmot_quality

    return run_tfmot_quality(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _throughput(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.finetune_throughput import run_throughput

    return run_throughput(smoke=smoke, cache_dir=cache_dir)


def _service(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.service_load import run_service_load

    return run_service_load(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _exports(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.exports import run_exports

    return run_exports(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _search(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.search import run_search_bench

    return run_search_bench(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _compaction(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.compaction import run_compaction

    return run_compaction(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _calibration(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.calibration import run_calibration

    return run_calibration(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _structure(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.structure import run_structure

    return run_structure(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _bigmodel(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.big_model import run_big_model

    return run_big_model(smoke=smoke, work_dir=work_dir)


def _datasets(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.datasets import run_datasets

    return run_datasets(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


def _datasets_memory(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.datasets import run_memory

    return run_memory(smoke=smoke, cache_dir=cache_dir, work_dir=work_dir)


# section name (bench/results.py) -> its runner
RUNNERS: dict[str, Runner] = {
    "resnet": _resnet,
    "digits": _digits,
    "tfmot": _tfmot,
    "throughput": _throughput,
    "service": _service,
    "exports": _exports,
    "compaction": _compaction,
    "search": _search,
    "datasets": _datasets,
    "calibration": _calibration,
    "structure": _structure,
    "bigmodel": _bigmodel,
    "datasets_memory": _datasets_memory,
}


def run_sections(
    only: str | list[str] | None = None,
    smoke: bool = False,
    repeats: int | None = None,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the selected benchmarks; returns ``{name: {..., "markdown", "bench_wall_s"}}``."""
    selected = [only] if isinstance(only, str) else list(only or SECTIONS)
    unknown = [name for name in selected if name not in ALL_SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {', '.join(ALL_SECTIONS)}")
    results: dict[str, Any] = {}
    for name in ALL_SECTIONS:
        if name not in selected:
            continue
        tick = time.perf_counter()
        results[name] = RUNNERS[name](
            smoke, repeats, cache_dir, None if work_dir is None else work_dir / name
        )
        results[name]["bench_wall_s"] = time.perf_counter() - tick
        print(f"[run] {name}: {results[name]['bench_wall_s']:.0f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Secateurs benchmarks")
    parser.add_argument("--only", nargs="+", choices=list(ALL_SECTIONS), default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny stand-ins through the same code paths")
    parser.add_argument("--repeats", type=int, default=None, help="ResNet repeats (default 2; smoke 1)")
    args = parser.parse_args(argv)
    results = run_sections(only=args.only, smoke=args.smoke, repeats=args.repeats)
    path = write_results(results, smoke=args.smoke)
    for name in ALL_SECTIONS:
        if name in results:
            print(results[name]["markdown"])
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
