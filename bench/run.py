"""Run the benchmarks and write the results: ``python -m bench.run [--only NAME ...] [--smoke]``.

Sections (``SECTIONS``):

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
- ``exports``: zipped bytes and accuracy of the dense / pruned SavedModel and every TFLite file of the digits
  CNN at 80% (and 50% channels, compacted) (bench/exports.py).

Opt-in (``OPT_IN``, run only when named in ``--only``; many minutes, tens of GB of disk and RAM):

- ``bigmodel``: issue 14 (b), a ~1 B-parameter plain ``tf.Module`` SavedModel (~4 GB) uploaded, pruned and
  downloaded through the API on S3 vs a bare-TensorFlow load+prune+save+zip (bench/big_model.py).

``bench/RESULTS.md`` is edited, not regenerated: every section lives between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` markers and carries its own date, machine and versions, so ``--only tfmot`` rewrites
that block and leaves everything else in the file (other sections, text written by hand) as it was. A section
without markers yet is appended. ``--smoke`` runs tiny stand-ins through the same code paths (real server
subprocess, real HTTP, real tfmot and floor subprocesses) and writes a fresh ``bench/out/RESULTS.smoke.md``
instead, never ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, ROOT, machine, versions

RESULTS = ROOT / "bench" / "RESULTS.md"
SMOKE_RESULTS = OUT_DIR / "RESULTS.smoke.md"

# name -> (title, runner(smoke, repeats, cache_dir, work_dir)); runners import their module lazily.
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


def _bigmodel(
    smoke: bool, repeats: int | None, cache_dir: Path | None, work_dir: Path | None
) -> dict[str, Any]:
    from bench.big_model import run_big_model

    return run_big_model(smoke=smoke, work_dir=work_dir)


SECTIONS: dict[str, tuple[str, Runner]] = {
    "resnet": ("ResNet-50: API job vs the floor", _resnet),
    "digits": ("Digits: quality after pruning", _digits),
    "tfmot": ("Digits: Secateurs vs tfmot (quality and size)", _tfmot),
    "throughput": ("Fine-tuning throughput", _throughput),
    "service": ("Service: status polls under load, 1 GiB upload", _service),
    "exports": ("Exports: TFLite files of the pruned digits CNN", _exports),
    "compaction": ("Channel compaction: ResNet-50 / MobileNetV2 speed-ups, digits quality", _compaction),
    "search": ("Search: highest sparsity within an accuracy drop vs a manual grid", _search),
}
# Not in the default run (many minutes, tens of GB of disk and RAM): only when named in --only.
OPT_IN: dict[str, tuple[str, Runner]] = {
    "bigmodel": ("Largest model: ~1 B parameters through the API on S3 vs bare TensorFlow", _bigmodel),
}
ALL_SECTIONS: dict[str, tuple[str, Runner]] = {**SECTIONS, **OPT_IN}
HOW = (
    "Reproduce: `.venv/bin/python -m bench.run` (every section, ~15 min on 2 cores, plus ~30 s the first time to "
    "build the cached models; needs the `bench` extra: tfmot, tf_keras, matplotlib), `--only NAME [NAME ...]` "
    f"({', '.join(SECTIONS)}, and opt-in {', '.join(OPT_IN)}, which the full run leaves out; rewrites only those "
    "sections of this file), `--repeats N` (ResNet), `--smoke` "
    "(tiny stand-ins, about two minutes, writes bench/out/RESULTS.smoke.md). Method and fairness choices: the "
    "docstrings of bench/resnet_job.py, bench/digits_quality.py, bench/tfmot_quality.py and "
    "bench/finetune_throughput.py, bench/service_load.py, bench/exports.py, bench/search.py, "
    "bench/big_model.py.\n"
)


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
    for name, (_, runner) in ALL_SECTIONS.items():
        if name not in selected:
            continue
        tick = time.perf_counter()
        results[name] = runner(smoke, repeats, cache_dir, None if work_dir is None else work_dir / name)
        results[name]["bench_wall_s"] = time.perf_counter() - tick
        print(f"[run] {name}: {results[name]['bench_wall_s']:.0f} s", file=sys.stderr, flush=True)
    return results


def _facts() -> str:
    facts, ver = machine(), versions()
    return (
        f"{facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, {facts['os']}; Python {ver['python']}, "
        f"TensorFlow {ver['tensorflow']}, Keras {ver['keras']}, NumPy {ver['numpy']}, secateurs {ver['secateurs']}"
    )


def header(smoke: bool) -> str:
    title = "# Secateurs benchmarks" + (" (SMOKE: tiny stand-ins, numbers mean nothing)" if smoke else "")
    return "\n".join(
        [
            title,
            "",
            f"Last written: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {_facts()}. Each section says "
            "when, where and with which versions it ran: the machine is shared and noisy, so compare numbers "
            "measured side by side in one run, not across runs.",
            "",
            HOW,
        ]
    )


def section_markdown(name: str, result: dict[str, Any]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"## {ALL_SECTIONS[name][0]}\n\n_Run {stamp} on {_facts()}; benchmark wall time "
        f"{result['bench_wall_s']:.0f} s._\n\n{result['markdown']}"
    )


def replace_block(text: str, name: str, body: str, at_start: bool = False) -> str:
    """``text`` with the block between ``<!-- bench:NAME -->`` markers replaced by ``body`` (markers kept);
    a missing block is added at the end (or at the start with ``at_start``)."""
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if at_start:
        return block + ("\n" + text if text else "")
    return (text.rstrip() + "\n\n" if text.strip() else "") + block


def write_results(results: dict[str, Any], smoke: bool, path: Path | None = None) -> Path:
    """Update the report in place (fresh file for smoke runs); full runs also keep each section's JSON
    under bench/out/."""
    path = path or (SMOKE_RESULTS if smoke else RESULTS)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() and not smoke else ""
    text = replace_block(text, "header", header(smoke), at_start=True)
    for name in ALL_SECTIONS:
        if name not in results:
            continue
        text = replace_block(text, name, section_markdown(name, results[name]))
        if not smoke:
            (OUT_DIR / f"section-{name}.json").write_text(json.dumps(results[name], indent=2, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


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
