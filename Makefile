# ldm: the two commands people need are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install run demo-model test test-slow bench clean

install: $(STAMP)

# Torch is pinned and installed first: an unpinned torch (or anything that pulls torchvision) would fetch
# a multi-GB CUDA build. open_clip_torch is installed without its dependencies (torchvision, timm): ldm only
# reads the BPE vocabulary file it ships.
$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements-lock.txt -e '.[test,serve]'
	$(PIP) install -c requirements-lock.txt --no-deps open_clip_torch
	@! $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)" \
		|| (echo "torchvision is installed in $(VENV); it breaks transformers' CLIP on CPU. Remove it." && exit 1)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && timeout 900 apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "no chromium: the web page's browser test will skip (Debian: apt-get install chromium)"
	touch $(STAMP)

run: install
	$(VENV)/bin/ldm txt2img "large red circle on the left, blue background" --outdir outputs

# Retrain the bundled model ldm/demo/ldm-demo-shapes.safetensors from scratch (~55 min on 2 CPU cores; see
# tools/demo.py train). Intermediate files go to runs/demo-shapes.
demo-model: install
	$(PY) tools/demo.py train

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) tools/bench.py load

clean:
	rm -rf $(VENV) build *.egg-info
