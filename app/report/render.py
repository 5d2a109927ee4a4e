"""One job's metrics document -> one self-contained HTML page (``GET /v1/jobs/{id}/report``).

Self-contained and inert: no script at all, one inline ``<style>``, figures as inline SVG (``app.report.plots``),
nothing fetched from anywhere, so the page is served with ``CONTENT_SECURITY_POLICY`` and still renders in full.
Every string that came from a user or a model (names, notes, spec values, variable names) goes through
``_e`` (``html.escape`` with quotes); numbers are formatted here. The document is read defensively: a
section that is missing or shaped unexpectedly is skipped or shown as a plain table, never an error, since
the report must render for documents written by older and newer workers alike.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.schemas.vocabulary import JobKind, kind_of

# The page's own copy (a <meta> element, so a saved file keeps it) cannot carry frame-ancestors: browsers
# ignore that directive there and log a console error. The HTTP header carries the full policy.
META_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
)
CONTENT_SECURITY_POLICY = f"{META_POLICY}; frame-ancestors 'none'"
# Metrics compared side by side (when present), in this order; the rest of a side's numbers follow.
_ORDER = (
    "accuracy",
    "top5_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "loss",
    "mse",
    "mae",
    "r2",
)
_SKIP_METRICS = {"task", "confusion_matrix", "classification_report", "per_target"}
_MAX_GENERIC_DEPTH = 4

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2327;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d5da}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#5b6670;margin:0 0 16px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:12px 16px;margin:12px 0;overflow-x:auto}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #e1e4e8;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f0f2f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#2e7d32}.bad{color:#c62828}pre{background:#f0f2f4;padding:8px;overflow:auto;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e1e4e8;border-radius:6px;
padding:10px 14px;min-width:150px}.card b{display:block;font-size:20px}.card span{color:#5b6670;font-size:12px}
figure{margin:8px 0}svg{max-width:100%;height:auto}ul{margin:4px 0;padding-left:20px}
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "\u2013" if value is None else _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "\u2013"
        return f"{value:.{digits}g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return _e(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "\u2013"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return "\u2013"  # pragma: no cover


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """Cells are already-escaped HTML; columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested tables (for sections this page has no dedicated layout for)."""
    if isinstance(value, Mapping):
        if not value:
            return "<i>empty</i>"
        if depth >= _MAX_GENERIC_DEPTH:
            return f"<pre>{_e(json.dumps(value, indent=1, default=str))}</pre>"
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_generic(v, depth + 1)}</td></tr>" for k, v in value.items()
        )
        return f"<table>{rows}</table>"
    if isinstance(value, list):
        if not value:
            return "<i>none</i>"
        if all(isinstance(v, Mapping) for v in value) and depth < _MAX_GENERIC_DEPTH:
            keys = list(dict.fromkeys(k for v in value for k in v))[:16]
            rows = [[_scalar(v.get(k), depth + 1) for k in keys] for v in value[:200]]
            return _table(keys, rows, numeric_from=len(keys))
        if all(not isinstance(v, Mapping | list) for v in value):
            return _e(", ".join(_plain(v) for v in value[:200]))
        return f"<pre>{_e(json.dumps(value[:200], indent=1, default=str))}</pre>"
    return _scalar(value, depth)


def _scalar(value: Any, depth: int) -> str:
    if isinstance(value, Mapping | list):
        return _generic(value, depth)
    if isinstance(value, str):
        return _e(value)
    return _num(value)


def _plain(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(render: Callable[[], str], caption: str) -> str:
    """An inline SVG figure; a figure that cannot be drawn says so instead of failing the page."""
    try:
        svg = render()
    except Exception as exc:  # a plot is decoration: the tables carry the same numbers
        return f"<p><i>figure not drawn ({_e(type(exc).__name__)}: {_e(str(exc)[:200])})</i></p>"
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


# --- reading the document -------------------------------------------------------------------------------------


def _flat_metrics(side: Mapping[str, Any] | None) -> dict[str, Any]:
    """The side's quality metrics: flat (API.md) or, per output, the first output's."""
    metrics = _map(side).get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    if "task" in metrics or any(k in metrics for k in _ORDER):
        return dict(metrics)
    first = next((v for v in metrics.values() if isinstance(v, Mapping)), None)
    return dict(first) if first else {}


def _metric_names(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    names = [k for k in _ORDER if k in before or k in after]
    rest = [
        k
        for k in dict.fromkeys([*before, *after])
        if k not in names and k not in _SKIP_METRICS and _is_number(before.get(k, after.get(k)))
    ]
    return names + rest


def _map(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one: sections are read defensively."""
    return value if isinstance(value, Mapping) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def job_kind(document: Mapping[str, Any]) -> JobKind:
    """The kind's spec field or its metrics section, whichever the document has, tells."""
    spec = _map(document.get("spec"))
    return kind_of(lambda field, section: bool(spec.get(field) or document.get(section)))


# --- sections -------------------------------------------------------------------------------------------------


def _cards(document: Mapping[str, Any]) -> str:
    baseline, pruned = _map(document.get("baseline")), _map(document.get("pruned"))
    before, after = _flat_metrics(baseline), _flat_metrics(pruned)
    primary = next((k for k in ("accuracy", "mse", "mae") if k in before or k in after), None)
    totals = _map(baseline.get("params")).get("total"), _map(pruned.get("params")).get("total")
    if _map(document.get("structure")).get("compact") and all(isinstance(t, int) and t > 0 for t in totals):
        # Removed channels leave no zeros to count: the gain is in the parameter count.
        cards = [("parameters", f"{totals[1]:,}", f"{totals[0] / totals[1]:.2f}x fewer: channels removed")]
    else:
        cards = [("sparsity", _num(pruned.get("sparsity"), 3), "of the prunable weights are zero")]
    if primary:
        cards.append(
            (
                primary,
                f"{_num(before.get(primary))} \u2192 {_num(after.get(primary))}",
                "baseline \u2192 pruned",
            )
        )
    zips = (_map(baseline.get("size_bytes")).get("zip"), _map(pruned.get("size_bytes")).get("zip"))
    if all(_is_number(z) for z in zips) and zips[1]:
        cards.append(
            ("zip size", f"{_bytes(zips[1])}", f"{zips[0] / zips[1]:.2f}x smaller than {_bytes(zips[0])}")
        )
    total = (_map(document.get("timings_s"))).get("total")
    if _is_number(total):
        cards.append(("job time", f"{total:.1f} s", "wall clock on the worker"))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><span>{_e(title)}</span><b>{value}</b><span>{_e(hint)}</span></div>'
            for title, value, hint in cards
        )
        + "</div>"
    )


def _quality(document: Mapping[str, Any]) -> str:
    before = _flat_metrics(document.get("baseline"))
    after = _flat_metrics(document.get("pruned"))
    if not before and not after:
        return _section("Quality", "<p>No labelled evaluation data: quality metrics are null.</p>", "quality")
    rows = []
    for name in _metric_names(before, after):
        b, a = before.get(name), after.get(name)
        change = ""
        if _is_number(a) and _is_number(b):
            diff = a - b
            worse = diff > 0 if name in ("loss", "mse", "mae") else diff < 0
            cls = "bad" if worse and abs(diff) > 1e-12 else "good"
            change = f'<span class="{cls}">{diff:+.4g}</span>'
        rows.append([_e(name), _num(b), _num(a), change])
    body = _table(["metric", "baseline", "pruned", "change"], rows)
    fidelity = (_map(document.get("pruned"))).get("fidelity")
    if isinstance(fidelity, Mapping):
        body += "<h3>Fidelity (pruned vs baseline predictions)</h3>" + _generic(fidelity)
    matrices = [
        (title, m)
        for title, m in (
            ("baseline", before.get("confusion_matrix")),
            ("pruned", after.get("confusion_matrix")),
        )
        if isinstance(m, list) and m and all(isinstance(r, list) for r in m)
    ]
    if matrices:
        from app.report import plots

        body += "<h3>Confusion matrices</h3>" + _figure(
            lambda: plots.confusion_matrices(matrices), "rows: true class, columns: predicted class"
        )
    return _section("Quality: baseline vs pruned", body, "quality")


def _costs(document: Mapping[str, Any]) -> str:
    baseline, pruned = _map(document.get("baseline")), _map(document.get("pruned"))

    def both(get: Callable[[Mapping[str, Any]], Any], fmt: Callable[[Any], str] = _num) -> list[str]:
        b, a = get(baseline), get(pruned)
        ratio = f"{b / a:.2f}x" if _is_number(a) and _is_number(b) and a else ""
        return [fmt(b), fmt(a), ratio]

    def path(*keys: str) -> Callable[[Mapping[str, Any]], Any]:
        def get(side: Mapping[str, Any]) -> Any:
            value: Any = side
            for key in keys:
                value = value.get(key) if isinstance(value, Mapping) else None
            return value

        return get

    rows = [
        ["params (total)", *both(path("params", "total"))],
        ["params (nonzero)", *both(path("params", "nonzero"))],
        ["SavedModel size", *both(path("size_bytes", "saved_model"), _bytes)],
        ["zip size", *both(path("size_bytes", "zip"), _bytes)],
        ["MACs (dense)", *both(path("macs", "dense_macs"))],
        ["MACs (nonzero weights)", *both(path("macs", "effective_macs"))],
    ]
    batches = sorted(
        set(_map(baseline.get("latency_ms"))) | set(_map(pruned.get("latency_ms"))),
        key=lambda b: int(b) if str(b).isdigit() else 0,
    )
    for batch in batches:
        for stat in ("p50", "p95"):
            rows.append([f"latency {stat}, batch {_e(batch)} (ms)", *both(path("latency_ms", batch, stat))])
    return _section(
        "Size, compute and latency",
        _table(["", "baseline", "pruned", "baseline / pruned"], rows),
        "costs",
    )


def _layers(document: Mapping[str, Any]) -> str:
    layers = [r for r in document.get("layers") or [] if isinstance(r, Mapping)]
    if not layers:
        return ""
    from app.report import plots

    # Calibration criteria say which method pruned each variable (the criterion, or magnitude where it could
    # not read the variable's op inputs): a column only when some row has one.
    methods = any(r.get("method") for r in layers)
    rows = [
        [
            _e(r.get("name")),
            _e("x".join(str(d) for d in r.get("shape") or [])),
            _num(r.get("params")),
            _num(r.get("target"), 3),
            _num(r.get("sparsity"), 3),
            *([_e(r.get("method") or "")] if methods else []),
            _e(r.get("skipped") or ""),
        ]
        for r in layers
    ]
    body = _figure(lambda: plots.layer_sparsity(layers), "per-variable sparsity (first 60 variables)")
    head = ["variable", "shape", "params", "target", "sparsity", *(["method"] if methods else [])]
    body += _table([*head, "left dense because"], rows, numeric_from=2)
    return _section("Per-layer sparsity", body, "layers")


def _search(document: Mapping[str, Any]) -> str:
    search = document.get("search")
    if not isinstance(search, Mapping):
        return ""
    from app.report import plots

    trials = [t for t in search.get("trials") or [] if isinstance(t, Mapping)]
    metric = str(search.get("metric", "metric"))
    points: dict[str, list[tuple[float, float, bool | None]]] = {}
    for t in trials:
        if _is_number(t.get("sparsity")) and _is_number(t.get("metric")):
            label = "one-shot probes" if t.get("phase") == "probe" else "trials (whole spec)"
            points.setdefault(label, []).append(
                (float(t["sparsity"]), float(t["metric"]), bool(t.get("passed")))
            )
    summary = {k: v for k, v in search.items() if k != "trials"}
    body = _generic(summary)
    if points:
        body += _figure(
            lambda: plots.metric_curve(
                points, metric, _f(search.get("baseline")), _f(search.get("threshold")), "search trials"
            ),
            "every trial: green passed, red failed; dotted red line: the pass threshold; dashed line: one-shot probes",
        )
    if trials:
        body += "<h3>Trials</h3>" + _generic(trials)
    return _section("Search: the highest sparsity within the drop", body, "search")


def _sweep(document: Mapping[str, Any]) -> str:
    sweep = document.get("sweep")
    if not isinstance(sweep, Mapping):
        return ""
    from app.report import plots

    points = [p for p in sweep.get("points") or [] if isinstance(p, Mapping)]
    metric = str(sweep.get("metric", "metric"))
    body = _generic({k: v for k, v in sweep.items() if k != "points"})
    curve = [
        (float(p["sparsity"] if _is_number(p.get("sparsity")) else p["target"]), float(p["metric"]), None)
        for p in points
        if _is_number(p.get("target")) and _is_number(p.get("metric"))
    ]
    if curve:
        baseline = _f(sweep.get("baseline"))
        body += _figure(
            lambda: plots.metric_curve({"targets": curve}, metric, baseline, None, "sweep"),
            f"{metric} vs sparsity",
        )
        x_key = str(sweep.get("pareto_x", "zip_bytes"))
        body += _figure(
            lambda: plots.pareto_front(points, x_key, metric),
            f"{metric} vs {x_key.replace('_', ' ')}: the joined points are not dominated by any other",
        )
    if points:
        body += "<h3>Points</h3>" + _generic(points)
    return _section("Sweep: one run per target", body, "sweep")


def _sensitivity(document: Mapping[str, Any]) -> str:
    section = document.get("sensitivity")
    if not isinstance(section, Mapping):
        return ""
    from app.report import plots

    sparsities = [float(s) for s in section.get("sparsities") or [] if _is_number(s)]
    rows = [r for r in section.get("variables") or [] if isinstance(r, Mapping)]
    body = _generic({k: v for k, v in section.items() if k not in ("variables", "layer_sparsity")})
    suggested = section.get("layer_sparsity")
    if isinstance(suggested, Mapping):
        body += (
            "<h3>Suggested layer_sparsity</h3><p>Paste into the next job's spec:</p>"
            f"<pre>{_e(json.dumps({'layer_sparsity': suggested}, indent=1))}</pre>"
        )
    drops = [[_f(d) for d in (r.get("drops") or [])] for r in rows]
    if rows and sparsities and all(len(d) == len(sparsities) for d in drops):
        names = [str(r.get("name", "?")) for r in rows]
        body += _figure(
            lambda: plots.sensitivity_heatmap(names, sparsities, drops),
            "darker = larger drop of the metric when only this variable is pruned (most sensitive first)",
        )
    if rows:
        table = [
            [
                _e(r.get("name")),
                _num(r.get("params")),
                f"skipped: {_e(r['skipped'])}"
                if r.get("skipped")
                else _num(r.get("max_sparsity_within_drop"), 3),
            ]
            + [_num(v) for v in (r.get("metrics") or [])]
            for r in rows
        ]
        header = ["variable", "params", "max sparsity within drop", *[f"@{s:g}" for s in sparsities]]
        body += "<h3>Metric per sparsity level</h3>" + _table(header, table)
    return _section("Sensitivity: one variable pruned at a time", body, "sensitivity")


def _f(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _other(document: Mapping[str, Any], key: str, title: str) -> str:
    value = document.get(key)
    return _section(title, _generic(value), key) if value else ""


def _notes(document: Mapping[str, Any]) -> str:
    notes = [n for n in document.get("notes") or [] if n is not None]
    if not notes:
        return ""
    return _section("Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>", "notes")


def _guarded(name: str, build: Callable[[], str]) -> str:
    """One section; a document shaped in a way this page does not know shows a line instead of a 500."""
    try:
        return build()
    except Exception as exc:  # the rest of the page is still worth reading
        return f"<p><i>section {_e(name)} not rendered ({_e(type(exc).__name__)})</i></p>"


def render_report(document: Mapping[str, Any], title: str | None = None) -> str:
    """The HTML page for one job's metrics document; ``title`` (e.g. the model's name) is escaped too."""
    job_id, model_id = document.get("job_id", "?"), document.get("model_id", "?")
    kind = job_kind(document)
    heading = f"Secateurs report: {title}" if title else "Secateurs report"
    versions = _map(document.get("versions"))
    parts: list[tuple[str, Callable[[], str]]] = [
        ("summary", lambda: _cards(document)),
        ("search", lambda: _search(document)),
        ("sweep", lambda: _sweep(document)),
        ("sensitivity", lambda: _sensitivity(document)),
        ("quality", lambda: _quality(document)),
        ("costs", lambda: _costs(document)),
        ("layers", lambda: _layers(document)),
        ("other", lambda: _other(document, "structure", "Structure (channel groups and compaction)")),
        ("other", lambda: _other(document, "exports", "Exports")),
        ("other", lambda: _other(document, "cross_validation", "Cross-validation")),
        ("other", lambda: _other(document, "preprocessing", "Preprocessing")),
        ("notes", lambda: _notes(document)),
        (
            "spec",
            lambda: _section(
                "Spec", f"<pre>{_e(json.dumps(document.get('spec'), indent=1, default=str))}</pre>", "spec"
            ),
        ),
        ("other", lambda: _other(document, "timings_s", "Timings (s)")),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(META_POLICY)}">'
        f"<title>{_e(heading)} ({_e(job_id)})</title><style>{_STYLE}</style></head><body><main>"
        f"<h1>{_e(heading)}</h1>"
        f'<p class="sub">job {_e(job_id)} \u00b7 model {_e(model_id)} \u00b7 kind {_e(kind)} \u00b7 '
        f"secateurs {_e(versions.get('secateurs', '?'))}, TensorFlow {_e(versions.get('tensorflow', '?'))}</p>"
        + "".join(_guarded(name, build) for name, build in parts)
        + "</main></body></html>\n"
    )
