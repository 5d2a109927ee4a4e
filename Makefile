# One entry point for people and CI. `make serve` / `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# One xdist worker per core plus one: tests that wait on the servers they start leave a core idle, and a third
# worker on 2 cores measured 690 s against 783 s for two (docs/architecture.md). A module's tests stay on one
# worker (--dist loadscope), so its module-scoped servers start once; modules go out longest first
# (tests/conftest.py SLOW_FIRST; xdist's own reordering, most tests first, is off).
WORKERS     ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
XDIST       ?= -n $(WORKERS) --dist loadscope --no-loadscope-reorder
PYTEST_ARGS ?= -m "not slow"

.PHONY: install serve worker test test-fast test-slow lint docs bench bench-smoke fashion-mnist clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)  ## API + one embedded worker on 127.0.0.1:8000, data in ./var (no external server)
	$(BIN)/secateurs serve

worker: $(STAMP)  ## a production worker (needs SECATEURS_BROKER_URL=redis://...)
	$(BIN)/secateurs worker

lint: $(STAMP)
	$(BIN)/ruff check app worker tests bench examples

docs: $(STAMP)  ## the documentation site into ./site (offline; --strict: a broken link or anchor fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# The docs site is built (--strict) by tests/packaging/test_docs_site.py, so `test` does not build it again.
test: $(STAMP) lint  ## the whole suite but `slow` (7-12 min on 2 cores, by the host's load); CI=true: Redis/PostgreSQL/S3 tests fail instead of skip
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the inner loop (~4.5 min with a warm model cache): no real servers (e2e), no `slow`
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not e2e"

test-slow: $(STAMP)  ## only the tests marked slow (ResNet50/MobileNetV2 compaction, bench smoke tfmot/throughput/search)
	$(BIN)/python -m pytest -m slow

# The benches judge quality on real data: Debian's dataset-fashion-mnist (IDX files, MIT), installed once.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@test -f $(FASHION) || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist; }

bench: $(STAMP) fashion-mnist  ## full benchmarks (~15 min on 2 cores), updates bench/RESULTS.md; one section: make bench ONLY=tfmot
	$(BIN)/python -m bench.run $(if $(ONLY),--only $(ONLY))

bench-smoke: $(STAMP) fashion-mnist  ## tiny stand-ins (~1-2 min), writes bench/out/RESULTS.smoke.md
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf var site .pytest_cache .ruff_cache
