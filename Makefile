# Everything set up from a fresh clone: `make up` runs the service, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DATA ?= .data
TINY := $(DATA)/tiny-model

.PHONY: install lock browser promtool up test lint bench clean

# torch first, from the CPU wheel (requirements/torch.txt: torch==2.13.0), so that
# nothing later pulls the multi-GB CUDA build; then every other package exactly as locked, each file
# checked against its hash (requirements/test.txt, made by `make lock`), then the
# project itself and its Python client (clients/python: httpx and pydantic, both in the
# lock) without dependencies, and pip's check that nothing is missing.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml requirements/torch.txt requirements/test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/torch.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps -e clients/python
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

# The locks, from pyproject.toml's lists: the tests' first, then the worker image's and
# the API image's held to the versions the tests run (so the images ship what was
# tested). Each file starts with the command that made it. torch is left out (installed
# first, above and in Dockerfile.worker) but resolved as requirements/torch.txt pins it,
# from the CPU wheel in pip's find-links folder here: so CUDA's nvidia-*, cuda-* and
# triton packages stay out too. Needs uv (`pip install uv`) and PyPI.
UV ?= uv
LOCK := $(UV) pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform linux --find-links /opt/wheels --constraint requirements/torch.txt \
	--no-emit-package torch
TESTED := --constraint requirements/test.txt
lock:
	$(LOCK) --extra test --custom-compile-command "$(LOCK) --extra test -o requirements/test.txt" \
	  -o requirements/test.txt
	$(LOCK) --extra worker --extra tracing $(TESTED) --custom-compile-command \
	  "$(LOCK) --extra worker --extra tracing $(TESTED) -o requirements/worker.txt" \
	  -o requirements/worker.txt
	$(LOCK) --extra tracing $(TESTED) --custom-compile-command \
	  "$(LOCK) --extra tracing $(TESTED) -o requirements/api.txt" -o requirements/api.txt

# With no model configured, serve a small RANDOM checkpoint (verdicts meaningless) so
# that the whole service runs offline; set OFA_MODEL_DIR or OFA_MODEL for a real one.
up: install
	@if [ -z "$$OFA_MODEL_DIR$$OFA_MODEL" ]; then \
	  [ -f $(TINY)/config.json ] || $(BIN)/ofa-entail model tiny $(TINY); \
	  echo "No model configured: serving the RANDOM tiny checkpoint in $(TINY)"; \
	  OFA_MODEL_DIR=$(TINY) OFA_MODEL=tiny-random OFA_MODEL_REVISION=seed0 $(BIN)/ofa-entail up; \
	else \
	  $(BIN)/ofa-entail up; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Headless Chromium and its driver for the browser tests: Debian's packages.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing Debian's chromium and chromium-driver (browser tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; \
	fi

# promtool for the alerts' tests (tests/test_monitoring.py), from Debian's prometheus
# package: unpacked rather than installed, so that no Prometheus service is set up or
# started on the machine (promtool is one static binary).
promtool:
	@if ! command -v promtool >/dev/null; then \
	  echo "installing promtool from Debian's prometheus package (the alerts' tests)"; \
	  tmp="$$(mktemp -d)" && apt-get update -qq && \
	  (cd "$$tmp" && apt-get download -qq prometheus 2>/dev/null) && \
	  dpkg -x "$$tmp"/prometheus_*.deb "$$tmp/x" && \
	  install -m 755 "$$tmp/x/usr/bin/promtool" /usr/local/bin/promtool && rm -rf "$$tmp"; \
	fi

# Then the modules that kill, freeze or restart processes (and the payload sweep) again
# with the payloads on an object store (moto's S3 server) and on a Redis pool (two
# embedded Valkey servers) in place of the local folder: nothing lost with any store.
E2E := tests/e2e
KILL_TESTS := $(E2E)/test_crash.py $(E2E)/test_reaper.py $(E2E)/test_limbo.py \
	$(E2E)/test_redis_restart.py $(E2E)/test_payload_sweep.py \
	$(E2E)/test_jobs.py::test_a_stopping_worker_finishes_its_running_chunk_and_hands_back_the_held_ones \
	$(E2E)/test_scans.py::test_cancel_spares_jobs_others_wait_for \
	$(E2E)/test_scans.py::test_coordinator_killed_mid_scan_resumes \
	$(E2E)/test_scans.py::test_interactive_job_is_not_stuck_behind_a_scan \
	$(E2E)/test_scans.py::test_a_scan_whose_slices_keep_crashing_fails_with_its_callback
test: install browser promtool lint
	$(PY) -m pytest
	OFA_TEST_PAYLOAD_STORE=s3 $(PY) -m pytest $(KILL_TESTS)
	OFA_TEST_PAYLOAD_STORE=redis $(PY) -m pytest $(KILL_TESTS)

# Every benchmark, each writing its results file (machine, command, figures). The
# HTTP one needs wrk (Debian's package) as its external load generator. Long: the
# runtime benchmark runs ModelScope's reference at the OFA-Large shape (~15 min).
bench: install
	@command -v wrk >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(PY) -m bench.bench_http --seconds 4 --rounds 12 \
	  --out bench/results/http-cpu.md
	$(PY) -m bench.bench_plumbing --rows 10000 \
	  --out bench/results/plumbing-cpu.md
	$(PY) -m bench.bench_chunks --rows 12000 \
	  --out bench/results/chunks-cpu.md
	mkdir -p $(DATA)
	$(PY) -m bench.bench_plumbing --photo --direct-jobs 600 --out $(DATA)/photo-1.md
	OFA_PREPROCESS_PROCESSES=2 $(PY) -m bench.bench_plumbing --photo \
	  --direct-jobs 600 --out $(DATA)/photo-2.md
	{ cat $(DATA)/photo-1.md; echo; sed '1s/.*/## The same with OFA_PREPROCESS_PROCESSES=2/' \
	  $(DATA)/photo-2.md; } > bench/results/plumbing-photo-cpu.md
	$(PY) -m bench.bench_service --out bench/results/service-cpu.md
	$(PY) -m bench.bench_scan --out bench/results/scan-cpu.md
	$(PY) -m bench.bench_object_scan --rows 200000 --out bench/results/object-scan-cpu.md
	mkdir -p $(DATA)
	$(PY) -m bench.bench_durable_ack --appendfsync everysec --out $(DATA)/ack-1.md
	$(PY) -m bench.bench_durable_ack --appendfsync always --out $(DATA)/ack-2.md
	{ cat $(DATA)/ack-1.md; echo; sed '1s/.*/## The same with appendfsync always/' \
	  $(DATA)/ack-2.md; } > bench/results/durable-ack-cpu.md
	$(PY) -m bench.bench_runtime --out bench/results/runtime-cpu.md
	$(PY) -m bench.bench_runtime --dtype bfloat16 --batch-sizes 1,4 --baseline-items 2 \
	  --agreement 8 --out bench/results/runtime-cpu-bf16.md
	$(PY) -m bench.bench_tracing --rounds 12 --requests 3000 \
	  --out bench/results/tracing-off-cpu.md
	for store in durable local; do for image in tiny:2000 photo:600; do \
	  $(PY) -m bench.bench_redis_cost --image $${image%%:*} --payload-store $$store \
	    --label after --seconds 10 --rows $${image##*:} \
	    --out bench/results/redis-cost-cpu.md || exit 1; done; done

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache .mypy_cache .ruff_cache
