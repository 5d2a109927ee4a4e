"""Run the benchmarks and write the results: ``python -m bench.run [--only resnet|digits] [--smoke]``.

- ``resnet``: API job vs the floor (bench/resnet_job.py), ResNet-50 SavedModel, ``--repeats`` (default 2).
- ``digits``: accuracy after pruning through the API (bench/digits_quality.py).

The full run writes ``bench/RESULTS.md`` (date, machine, versions, the tables). With ``--only``, the other
section is taken from its last full run (``bench/out/section-<name>.md``, which carries its own date) when there
is one. ``--smoke`` runs tiny stand-ins through the same code paths (real server subprocess, real HTTP, real
floor subprocess: a small CNN instead of ResNet-50, 1 repeat, one sparsity, one seed) and writes
``bench/out/RESULTS.smoke.md`` instead, never ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, ROOT, machine, versions
from bench.digits_quality import run_digits
from bench.resnet_job import run_resnet

RESULTS = ROOT / "bench" / "RESULTS.md"
SMOKE_RESULTS = OUT_DIR / "RESULTS.smoke.md"
SECTIONS = ("resnet", "digits")
HOW = (
    "Reproduce: `.venv/bin/python -m bench.run` (both, ~5 min on 2 cores, plus ~30 s the first time to build the cached models), `--only resnet|digits`, "
    "`--repeats N` (ResNet), `--smoke` (tiny stand-ins, < 1 min, writes bench/out/RESULTS.smoke.md). "
    "Method and fairness choices: the docstrings of bench/resnet_job.py and bench/digits_quality.py.\n"
)


def run_sections(
    only: str | None = None,
    smoke: bool = False,
    repeats: int | None = None,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the selected benchmarks; returns ``{"resnet": {...}, "digits": {...}}`` (each with ``markdown``)."""
    results: dict[str, Any] = {}
    for name in SECTIONS:
        if only and name != only:
            continue
        tick = time.perf_counter()
        if name == "resnet":
            results[name] = run_resnet(
                smoke=smoke,
                repeats=repeats,
                cache_dir=cache_dir,
                work_dir=None if work_dir is None else work_dir / "resnet",
            )
        else:
            results[name] = run_digits(
                smoke=smoke, cache_dir=cache_dir, work_dir=None if work_dir is None else work_dir / "digits"
            )
        results[name]["bench_wall_s"] = time.perf_counter() - tick
        print(f"[run] {name}: {results[name]['bench_wall_s']:.0f} s", file=sys.stderr, flush=True)
    return results


def header(smoke: bool) -> str:
    facts = machine()
    ver = versions()
    title = "# Secateurs benchmarks" + (" (SMOKE: tiny stand-ins, numbers mean nothing)" if smoke else "")
    return "\n".join(
        [
            title,
            "",
            f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
            f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, {facts['os']}; shared and noisy, "
            "so compare numbers measured side by side in one run, not across runs.  ",
            f"Versions: Python {ver['python']}, TensorFlow {ver['tensorflow']}, Keras {ver['keras']}, "
            f"NumPy {ver['numpy']}, secateurs {ver['secateurs']}.",
            "",
            HOW,
        ]
    )


def section_markdown(name: str, result: dict[str, Any]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"## {'ResNet-50: API job vs the floor' if name == 'resnet' else 'Digits: quality after pruning'}\n\n" + (
        f"_Run {stamp}, benchmark wall time {result['bench_wall_s']:.0f} s._\n\n{result['markdown']}"
    )


def write_results(results: dict[str, Any], smoke: bool, path: Path | None = None) -> Path:
    """Write the markdown report; full runs also keep each section (and its JSON) under bench/out/."""
    path = path or (SMOKE_RESULTS if smoke else RESULTS)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    parts = [header(smoke)]
    for name in SECTIONS:
        cached = OUT_DIR / f"section-{name}.md"
        if name in results:
            text = section_markdown(name, results[name])
            if not smoke:
                cached.write_text(text)
                (OUT_DIR / f"section-{name}.json").write_text(
                    json.dumps(results[name], indent=2, default=str)
                )
            parts.append(text)
        elif not smoke and cached.is_file():
            parts.append(cached.read_text() + "\n_(from an earlier run: not re-run this time)_\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Secateurs benchmarks")
    parser.add_argument("--only", choices=SECTIONS, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny stand-ins through the same code paths")
    parser.add_argument("--repeats", type=int, default=None, help="ResNet repeats (default 2; smoke 1)")
    args = parser.parse_args(argv)
    results = run_sections(only=args.only, smoke=args.smoke, repeats=args.repeats)
    path = write_results(results, smoke=args.smoke)
    for name in SECTIONS:
        if name in results:
            print(results[name]["markdown"])
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
