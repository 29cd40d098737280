# Entry points for developers and CI. `make test` is what .ci/run calls.
VENV := .venv/bin

.PHONY: deps test lint run bench clean

deps:
	@scripts/setup-deps.sh

lint: deps
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy

test: lint
	$(VENV)/pytest -q

run: deps
	$(VENV)/pop3-gateway serve

bench: deps
	$(VENV)/python -m benchmarks

# Caches and build output only; the venv stays (rm -rf .venv to rebuild it from scratch).
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage htmlcov build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
