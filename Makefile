# diffalign: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is installed first from its pinned CPU wheel, then the package with the pin repeated,
# so no other build of torch is ever pulled in by a dependency.
TORCH  := torch==2.13.0
# one thread per test worker: two 2-thread torch processes on 2 cores run 6-8x slower
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
WORKERS ?= 2

.PHONY: install test test-fast demo bench bench-sampling bench-search bench-efficiency bench-reward-gradient bench-rewards bench-diffusers bench-throughput clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[all,dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -n $(WORKERS) --dist loadgroup -q

test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -n $(WORKERS) -q -m "not slow"

demo: $(STAMP)
	$(BIN)/diffalign demo $(if $(DEMO_CONFIG),--config $(DEMO_CONFIG))

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_train.py

bench-search: $(STAMP)
	$(BIN)/python benchmarks/bench_search.py

bench-efficiency: $(STAMP)
	$(BIN)/python benchmarks/bench_efficiency.py

# 2 threads, as the DDPO comparison of issue 20 was measured; THREADS=1 on a machine shared with other jobs
THREADS ?= 2
bench-throughput: $(STAMP)
	$(BIN)/python benchmarks/bench_throughput.py --threads $(THREADS)

bench-reward-gradient: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_reward_gradient.py

bench-diffusers: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_diffusers.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_video_io.py

bench-rewards: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_rewards.py --tasks
	$(BIN)/python benchmarks/geneval_agreement.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
