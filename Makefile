# Shortcuts for developers; the README's two commands are `bash scripts/run demo|test`
# (which need no `make`), and these targets call them.
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo:
	bash scripts/run demo

test:
	bash scripts/run test

bench: setup
	$(PY) benchmarks/bench_preprocess.py $$(bash benchmarks/make_songs.sh)

clean:
	rm -rf demo-output bench-output .pytest_cache
