# Two commands do everything on a fresh Debian machine with Python 3.11 and root:
#   make demo   - set up, then run Lastmile with synthetic studies (lastmile demo)
#   make test   - set up, then run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := events xnat_client dicom_rules ingest engine projections dashboards lastmile bench demo retraining sitecheck
APT_PACKAGES := $(shell grep -v '^\#' .ci/apt-packages.txt 2>/dev/null)

.PHONY: setup system-packages demo up test lint bench screenshots corpus corpus-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

setup: $(BIN)/python system-packages
	$(BIN)/pip install -q -e '.[test]'

demo: setup
	$(BIN)/lastmile demo

up: setup
	$(BIN)/lastmile up

test: setup
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/lint-imports  # the layer contract in pyproject.toml
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: setup
	$(BIN)/lastmile bench events

# The README's screenshots: the browser tests write theirs to test-artifacts/ (never to
# docs/); this refreshes docs/screenshots/ from a run of those tests.
SCREENSHOTS := dashboards/overview dashboards/agreement review/case-hfd review/blinded-reading
screenshots: setup
	$(BIN)/python -m pytest -q tests/dashboards/test_pages.py::test_every_page_renders_with_freshness \
	  tests/review/test_browser.py
	mkdir -p docs/screenshots
	for s in $(SCREENSHOTS); do cp test-artifacts/$$s.png docs/screenshots/; done

# The issue-14 corpus (real files from pydicom-data, pynetdicom, nibabel, deid-data and the
# xnat 0.8.1 sdist, downloaded once into ~/.cache/lastmile-corpus, plus generated variants)
# as .corpus/<AE>/<case>/ for `lastmile check`; FULL=1 for all of it, not the CI sample.
corpus: setup
	$(BIN)/python -m tests.corpus.build .corpus $(if $(FULL),--full)

# The corpus test: `lastmile check` over the corpus against a real `lastmile up`.
corpus-test: setup
	$(BIN)/python -m pytest -q -m corpus tests/corpus
