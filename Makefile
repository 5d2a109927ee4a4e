# One entry point for people and CI. `make serve` / `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -m "not slow"

.PHONY: install serve worker test test-slow lint docs bench bench-smoke clean

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

test: $(STAMP) lint docs  ## the whole suite but `slow`; CI=true makes Redis/PostgreSQL/S3 tests fail instead of skip
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)  ## only the tests marked slow (keras.applications ResNet50 compaction, ~1 min)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)  ## full benchmarks (~15 min on 2 cores), updates bench/RESULTS.md; one section: make bench ONLY=tfmot
	$(BIN)/python -m bench.run $(if $(ONLY),--only $(ONLY))

bench-smoke: $(STAMP)  ## tiny stand-ins (~1-2 min), writes bench/out/RESULTS.smoke.md
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf var site .pytest_cache .ruff_cache
