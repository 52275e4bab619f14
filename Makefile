.PHONY: run test lint bench

run:  ## install and run the platform on its embedded defaults
	./scripts/run.sh

test:  ## install and run the whole test suite
	./scripts/test.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench:
	.venv/bin/python benchmarks/landing.py
