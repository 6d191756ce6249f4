# `make demo` and `make test` create (or refresh, when pyproject.toml or constraints.txt changed) the
# local virtual environment .venv, then do their job. torch is pinned by constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo lint test test-all clean chromium llama-cpp

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,hf,tensorboard]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/pico-llm train --dataset numbers --models transformer --prompt "0 1 2 3 4" \
		--output_dir runs --run_name demo --overwrite --max_new_tokens 16
	@echo
	$(VENV)/bin/pico-llm generate runs/demo --compare_p greedy,0.5,0.95,1.0 --max_new_tokens 16 --seed 0
	@echo
	@echo "run directory: runs/demo   (loss plot: runs/demo/loss.png, samples: runs/demo/samples.md)"

# Headless Chromium for the browser tests (Debian's packages): chromium renders the HTML reports,
# chromium-driver lets Selenium drive the serve playground. Installed once, skipped when present; where
# they cannot be installed, those tests are skipped with the reason.
chromium:
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  echo "installing chromium and chromium-driver (for the browser tests)"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	} || echo "note: chromium could not be installed; the browser tests will be skipped"

# llama.cpp for the GGUF tests (slow, in make test-all): llama-cpp-python from PyPI compiles llama.cpp on
# install, about 12 minutes on 2 cores the first time; pip keeps the built wheel in its cache after that.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
llama-cpp: venv
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  echo "installing $(LLAMA_CPP_PYTHON) (compiles llama.cpp: ~12 minutes the first time)"; \
	  $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt '$(LLAMA_CPP_PYTHON)'; }

lint: venv
	$(VENV)/bin/ruff check picollm tests bench pico-llm.py
	$(VENV)/bin/lint-imports

test: venv chromium lint
	$(PY) -m pytest -q

test-all: venv chromium llama-cpp
	$(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs *.egg-info
