"""HTML reports of jobs, rendered from the metrics document alone (no TensorFlow: the API serves them)."""

from app.report.render import CONTENT_SECURITY_POLICY, render_report

__all__ = ["CONTENT_SECURITY_POLICY", "render_report"]
