"""Matplotlib figures of a metrics document, as inline SVG strings (no TensorFlow, no pyplot).

Figures are built with ``matplotlib.figure.Figure`` and the SVG canvas directly, never through ``pyplot``: the
report is rendered in the API's thread pool, and pyplot's global figure manager is not thread-safe. Text is
drawn as glyph paths (``svg.fonttype = 'path'``), so a variable name ends up as outlines, and the only
place its characters appear is an XML comment that matplotlib escapes; ``_inline`` strips the XML prologue so
the SVG can sit inside HTML. Matplotlib is imported inside the functions: ``app.main`` must stay fast to import.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

_PROLOGUE = re.compile(r"^.*?(?=<svg\b)", re.S)
GOOD, BAD, NEUTRAL, ACCENT = "#2e7d32", "#c62828", "#607d8b", "#1565c0"


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; harmless if another backend was chosen explicitly
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _inline(fig: Any) -> str:
    """The figure as an ``<svg>`` element: no XML declaration, no DOCTYPE, no date metadata."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "secateurs"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    return _PROLOGUE.sub("", buffer.getvalue(), count=1)


def _short(name: str, limit: int = 38) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1) :]


def confusion_matrices(matrices: Sequence[tuple[str, list[list[int]]]]) -> str:
    """Side-by-side heat maps (rows: true class), one per (title, matrix), each cell annotated."""
    import numpy as np

    n = len(matrices)
    size = max(len(m) for _, m in matrices)
    cell = 3.2 if size <= 12 else 4.2
    fig = _figure(cell * n + 0.6, cell + 0.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, matrix) in zip(axes, matrices, strict=True):
        values = np.asarray(matrix, dtype=float)
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(1.0, float(values.max())))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.tick_params(labelsize=7)
        if values.shape[0] <= 12:
            peak = values.max() or 1.0
            for (i, j), v in np.ndenumerate(values):
                if v:
                    color = "white" if v > peak / 2 else "black"
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6, color=color)
    return _inline(fig)


def layer_sparsity(layers: Sequence[dict[str, Any]]) -> str:
    """Horizontal bars: measured sparsity per prunable variable, target marked when present."""
    rows = list(layers)[:60]
    fig = _figure(7.5, 0.8 + 0.26 * len(rows))
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    ax.barh(positions, [float(r.get("sparsity") or 0.0) for r in rows], color=ACCENT, height=0.6)
    targets = [(i, r["target"]) for i, r in enumerate(rows) if isinstance(r.get("target"), int | float)]
    if targets:
        ax.scatter([t for _, t in targets], [i for i, _ in targets], marker="|", s=120, color=BAD, zorder=3)
    ax.set_yticks(positions, [_short(str(r.get("name", "?"))) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (bar: measured, red tick: target)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return _inline(fig)


def metric_curve(
    series: dict[str, Sequence[tuple[float, float, bool | None]]],
    metric: str,
    baseline: float | None,
    threshold: float | None,
    title: str,
) -> str:
    """Metric vs sparsity, one line per series (e.g. one-shot probes, trials) in sparsity order; markers green
    passed, red failed, blue unknown; the baseline and the pass threshold as horizontal lines."""
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot()
    styles = [("-", "o"), ("--", "s"), (":", "^")]
    for (label, points), (line, marker) in zip(series.items(), styles * 4, strict=False):
        ordered = sorted(points)
        xs, ys = [p[0] for p in ordered], [p[1] for p in ordered]
        ax.plot(xs, ys, color=NEUTRAL, alpha=0.6, lw=1, ls=line, label=label)
        colors = [ACCENT if p is None else GOOD if p else BAD for _, _, p in ordered]
        ax.scatter(xs, ys, c=colors, s=28, marker=marker, zorder=3)
    if baseline is not None:
        ax.axhline(baseline, color=NEUTRAL, ls="--", lw=1, label=f"baseline {baseline:.4g}")
    if threshold is not None:
        ax.axhline(threshold, color=BAD, ls=":", lw=1, label=f"threshold {threshold:.4g}")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("sparsity", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return _inline(fig)


def pareto_front(points: Sequence[dict[str, Any]], x_key: str, metric: str) -> str:
    """Metric vs ``x_key`` (e.g. zip bytes) per sweep point; Pareto-optimal points joined and highlighted."""
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot()
    usable = [
        p
        for p in points
        if isinstance(p.get(x_key), int | float) and isinstance(p.get("metric"), int | float)
    ]
    front = sorted((p for p in usable if p.get("pareto")), key=lambda p: p[x_key])
    rest = [p for p in usable if not p.get("pareto")]
    ax.scatter([p[x_key] for p in rest], [p["metric"] for p in rest], color=NEUTRAL, s=24, label="dominated")
    ax.plot(
        [p[x_key] for p in front], [p["metric"] for p in front], color=GOOD, marker="o", ms=5, label="Pareto"
    )
    for p in usable:
        ax.annotate(
            f"{p.get('target', '')}",
            (p[x_key], p["metric"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel(x_key.replace("_", " "), fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title("sweep: Pareto front", fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _inline(fig)


def sensitivity_heatmap(
    names: Sequence[str], sparsities: Sequence[float], drops: list[list[float | None]]
) -> str:
    """Rows: variables (most sensitive first); columns: sparsity levels; colour: the metric's drop."""
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in drops], dtype=float)
    fig = _figure(7.5, 1.2 + 0.3 * len(names))
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1e-6
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities], fontsize=7)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    ax.set_xlabel("sparsity of this variable alone", fontsize=8)
    ax.set_title("sensitivity: metric drop when only one variable is pruned", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    return _inline(fig)
