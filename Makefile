# The two commands of the README:
#   make demo   set up everything, then run the main job end to end on a synthesised corpus
#   make test   set up everything, then run the test suite
# Both are idempotent: the set-up checks what is already there and skips it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-output

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dwave demo --out $(DEMO)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_preprocess.py $$(bash benchmarks/make_songs.sh)

clean:
	rm -rf $(DEMO) .pytest_cache
