"""What operators watch: Prometheus metrics (``prometheus``) and structured log lines (``logs``)."""
