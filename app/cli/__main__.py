"""``python -m app.cli ...`` (how tests and benchmarks start servers), the same as the ``secateurs`` script."""

from app.cli import main

raise SystemExit(main())
