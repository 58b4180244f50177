# The two commands of the README: `make demo` (set up, build and serve the demo label set)
# and `make test` (set up, lint, run every test including the slow real-data ones).
.PHONY: setup demo test bench bench-scale

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/softserve demo run

test: setup
	.venv/bin/ruff check .
	.venv/bin/pytest
	# the CUDA tests, skipped above without a GPU: their fp32 half on the CPU keeps them honest
	SOFTSERVE_TEST_DEVICE=cpu .venv/bin/pytest -q tests/test_cuda.py

bench: setup
	.venv/bin/python -m bench.relabel_bench
	.venv/bin/python -m bench.serve_bench

# ImageNet-shaped, end to end (N = 10,000 at 224 px, K = 1000): about an hour on two CPU cores
bench-scale: setup
	.venv/bin/python -m bench.scale_bench --json bench/results/scale_bench.json
