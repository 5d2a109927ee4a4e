"""The HTML report: escaping, the CSP header, the route's auth/409 rules, and the CLI download (no browser)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fastapi.testclient import TestClient

from app.report import CONTENT_SECURITY_POLICY, render_report
from tests.app.helpers import app_of, assert_problem, create_job, upload_model
from tests.app.report_documents import HOSTILE, prune_document, search_sweep_sensitivity_document
from tests.app.test_api_jobs import ARTIFACT, claim, finish_with_outputs, succeed


class _Tags(HTMLParser):
    """Every start tag and every attribute, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def test_user_strings_are_escaped_and_nothing_is_loaded() -> None:
    page = render_report(prune_document(), title=HOSTILE)
    parsed = _parse(page)
    assert "script" not in parsed.tags
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # the title, note, spec and layer name
    assert "&lt;b&gt;markup&lt;/b&gt;" in page and "<b>markup" not in page
    # nothing that would fetch: no src/href to anywhere, no @import or url() outside data:
    fetching = [
        (k, v)
        for k, v in parsed.attributes
        if k in ("src", "href", "action") and not (v or "").startswith("#")
    ]
    assert fetching == []
    assert not re.search(r"@import|url\((?!#)", page)
    assert {"svg", "table", "style"} <= set(parsed.tags)


def test_every_section_renders_its_figures() -> None:
    page = render_report(search_sweep_sensitivity_document())
    for anchor in ("search", "sweep", "sensitivity", "quality", "costs", "layers", "notes", "spec"):
        assert f'id="{anchor}"' in page
    assert (
        page.count("<svg") == 6
    )  # confusion matrices, layer bars, search curve, sweep curve, Pareto, heat map
    assert "figure not drawn" not in page
    assert "&quot;layer_sparsity&quot;" in page  # the suggested map, ready to paste


def test_unexpected_shapes_do_not_break_the_page() -> None:
    doc = {
        "job_id": "j",
        "baseline": {"metrics": None},
        "pruned": "nonsense",
        "layers": [1, None],
        "search": {"trials": [{"sparsity": "x"}]},
        "structure": {"groups": [[1, 2], {"a": {"b": {"c": {"d": 1}}}}]},
    }
    page = render_report(doc)
    assert "Structure" in page and "<html" in page


def test_report_route(client: TestClient) -> None:
    app = app_of(client)
    model = upload_model(client, name=HOSTILE)
    job = create_job(client, model["id"])
    assert job["links"]["report"] == f"/v1/jobs/{job['id']}/report"
    body = assert_problem(client.get(job["links"]["report"]), 409)
    assert "queued" in body["detail"]
    claim(app, job["id"])
    assert_problem(client.get(job["links"]["report"]), 409)

    finish_with_outputs(app, job["id"], ARTIFACT, prune_document(job["id"], model["id"]))
    got = client.get(job["links"]["report"])
    assert got.status_code == 200
    assert got.headers["content-type"] == "text/html; charset=utf-8"
    assert got.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "script-src" not in CONTENT_SECURITY_POLICY
    assert got.headers["x-content-type-options"] == "nosniff"
    assert HOSTILE not in got.text and job["id"] in got.text
    assert_problem(client.get("/v1/jobs/job_missing/report"), 404)


def test_report_of_another_tenant_is_404(client: TestClient) -> None:
    model = upload_model(client)
    job = create_job(client, model["id"])
    succeed(app_of(client), job["id"], ARTIFACT, prune_document(job["id"], model["id"]))
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 200
    from app.db.engine import session_scope
    from app.db.tables import JobRecord

    with session_scope(app_of(client).state.session_factory) as session:
        record = session.get(JobRecord, job["id"])
        assert record is not None
        record.tenant = "someone-else"
    assert_problem(client.get(f"/v1/jobs/{job['id']}/report"), 404)


def test_a_compacted_job_headlines_its_parameters_not_zero_sparsity() -> None:
    """Removed channels leave no zeros: the first card shows the parameter count the compaction reached."""
    document = prune_document()
    assert "of the prunable weights are zero" in render_report(document)
    document["pruned"]["params"] = {"total": 6398, "prunable": 6336, "nonzero": 6398}
    document["pruned"]["sparsity"] = 0.0
    document["structure"] = {"compact": True, "groups": []}
    page = render_report(document)
    assert "6,398" in page and "2.63x fewer: channels removed" in page
    assert "of the prunable weights are zero" not in page


def test_calibration_jobs_show_the_method_of_each_variable() -> None:
    """Wanda / SparseGPT jobs name the method per variable (magnitude where it fell back); others get no column."""
    document = prune_document()
    assert "<th>method</th>" not in render_report(document)
    document["layers"][0]["method"] = "sparsegpt"
    page = render_report(document)
    assert "<th>method</th>" in page and ">sparsegpt</td>" in page
