# jupyter_mesh: `make lab` runs JupyterLab with the extension; `make test` runs the suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# jlpm (from jupyterlab) must be on PATH when pip builds the lab extension
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PORT ?= 8888

.PHONY: venv lab demo test bench node pyvenv chromium lint clean

APT = if [ "$$(id -u)" = 0 ]; then apt-get $(1); else sudo apt-get $(1); fi

# (the lab extension's sources too: the environment holds a copy of its build, which a
# change to them must replace, or JupyterLab runs the old sidebar)
$(VENV)/.installed: pyproject.toml labextension/package.json labextension/yarn.lock \
		labextension/tsconfig.json $(wildcard labextension/schema/* labextension/style/*) \
		$(filter-out labextension/src/__tests__/%,$(wildcard labextension/src/*.ts \
		labextension/src/*/*.ts))
	@$(MAKE) --no-print-directory node pyvenv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,tpu]"
	touch $@

venv: $(VENV)/.installed

# Browser tests drive Debian's chromium (Playwright's own browser download is not used).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  $(call APT,update -qq) && $(call APT,install -y -qq chromium); }

# Debian's Python makes virtual environments only with its python3-venv package.
pyvenv:
	@$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || { \
	  $(call APT,update -qq) && $(call APT,install -y -qq python3-venv); }

# The lab extension is built with JupyterLab's jlpm, which runs on Node.js.
node:
	@command -v node >/dev/null 2>&1 || { \
	  $(call APT,update -qq) && $(call APT,install -y -qq nodejs); }

# The server starts an embedded local mesh (JUPYTER_MESH_AUTOSTART) shown in the Mesh tab.
MESH ?= cpu=2
lab: venv
	JUPYTER_MESH_AUTOSTART="$(MESH)" $(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(PORT) \
	  $(ROOT_FLAG) --ServerApp.root_dir=$(CURDIR)/examples

demo: venv
	$(PY) -m jupyter_mesh.demo examples/quickstart.ipynb

test: venv chromium lint
	$(PY) -m pytest

# Benchmarks print their tables and rewrite their sections of benchmarks/RESULTS.md.
# ipyparallel, the remote-cell benchmark's baseline, goes into a folder of its own
# (.bench-site), on the path of that benchmark only: in the environment of make lab it
# would add its server and lab extensions (and a deprecation warning at every start)
BENCH_SITE := $(CURDIR)/.bench-site
bench: venv
	$(PY) -m benchmarks.router --update
	$(PY) -m pip install -q --no-deps --upgrade --target $(BENCH_SITE) \
	  "ipyparallel>=8.8" tqdm decorator
	PYTHONPATH=$(BENCH_SITE) $(PY) benchmarks/remote_cells.py --update
	$(PY) benchmarks/tls.py --update

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) jupyter_mesh/labextension labextension/lib labextension/node_modules
