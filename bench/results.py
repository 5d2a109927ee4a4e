"""The results file, bench/RESULTS.md: its sections, their titles and the block-by-block edit.

The file is edited, not regenerated: every section lives between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` markers and carries its own date, machine and versions, so a rerun of one section
(``python -m bench.run --only tfmot``, ``python -m bench.big_model``, ``python -m bench.storage``) rewrites that
block and leaves everything else in the file (other sections, text written by hand) as it was. A section
without markers yet is appended. Here, not in bench/run.py, so that the scripts that write their own section
need not import the runner (which imports them).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, ROOT, machine, versions

RESULTS = ROOT / "bench" / "RESULTS.md"
SMOKE_RESULTS = OUT_DIR / "RESULTS.smoke.md"

# name -> title, in the file's order. SECTIONS: `python -m bench.run`'s default run; OPT_IN (many minutes, tens
# of GB of disk and RAM): only when named in --only.
SECTIONS: dict[str, str] = {
    "resnet": "ResNet-50: API job vs the floor",
    "digits": "Digits: quality after pruning",
    "tfmot": "Digits: Secateurs vs tfmot (quality and size)",
    "throughput": "Fine-tuning throughput",
    "service": "Service: status polls under load, 1 GiB upload",
    "exports": "Exports: TFLite files of the pruned digits CNN",
    "compaction": "Channel compaction: ResNet-50 / MobileNetV2 speed-ups, digits quality",
    "search": "Search: highest sparsity within an accuracy drop vs a manual grid",
    "datasets": "Datasets: streamed input speed, S3 vs local shards, one dataset in three forms",
    "calibration": "Calibration: Wanda, SparseGPT and channel repair, one-shot, vs magnitude",
    "structure": "Structure: attention heads, MLP widths, recurrent units, budgets, ONNX Runtime",
}
OPT_IN: dict[str, str] = {
    "bigmodel": "Largest model: ~1 B parameters through the API on S3 vs bare TensorFlow",
    "datasets_memory": "Datasets: worker memory flat in dataset size (~1 GB vs >= 30 GB streamed)",
}
ALL_SECTIONS: dict[str, str] = {**SECTIONS, **OPT_IN}
# Written only by their own module (``python -m bench.storage`` / ``bench.trials``: they start a deployment).
STANDALONE: dict[str, str] = {
    "storage": "Storage: workers on S3, transfer throughput",
    "trials": "Trials: sweeps, K-fold and search across worker processes",
}
HOW = (
    "Reproduce: `.venv/bin/python -m bench.run` (every section, ~15 min on 2 cores plus ~30 min for "
    "`calibration`, whose SparseGPT job on ResNet-50 takes most of it; the first time also builds the cached "
    "models: ~30 s, plus ~15 min for calibration's language model and CNNs; needs the `bench` extra: tfmot, tf_keras, matplotlib), `--only NAME [NAME ...]` "
    f"({', '.join(SECTIONS)}, and opt-in {', '.join(OPT_IN)}, which the full run leaves out; rewrites only those "
    "sections of this file), `--repeats N` (ResNet), `--smoke` "
    "(tiny stand-ins, about two minutes, writes bench/out/RESULTS.smoke.md). Method and fairness choices: the "
    "docstrings of bench/resnet_job.py, bench/digits_quality.py, bench/tfmot_quality.py and "
    "bench/finetune_throughput.py, bench/service_load.py, bench/exports.py, bench/search.py, "
    "bench/big_model.py, bench/datasets.py, bench/calibration.py, bench/structure.py.\n"
)


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
        f"## {ALL_SECTIONS.get(name) or STANDALONE[name]}\n\n_Run {stamp} on {_facts()}; benchmark wall time "
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


def write_section(name: str, result: dict[str, Any], smoke: bool, smoke_path: Path | None = None) -> Path:
    """One section run by its own module (``python -m bench.NAME``): its JSON under bench/out/ and its block in
    RESULTS.md; a smoke run writes ``smoke_path`` (default bench/out/RESULTS.NAME-smoke.md) and its own JSON,
    never the full run's."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if smoke else ""
    (OUT_DIR / f"section-{name}{suffix}.json").write_text(json.dumps(result, indent=2, default=str))
    path = (smoke_path or OUT_DIR / f"RESULTS.{name}-smoke.md") if smoke else RESULTS
    text = path.read_text() if path.is_file() else ""
    path.write_text(replace_block(text, name, section_markdown(name, result)))
    return path


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
