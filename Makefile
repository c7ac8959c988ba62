# The two commands of the README. Each creates/reuses .venv and installs what it needs.
#   make bench   -> python -m bench.compare (the main job)
#   make test    -> the whole test suite
# Pass arguments with ARGS, e.g. `make bench ARGS="--quick"`.
.PHONY: bench test venv
venv:
	@bash scripts/venv.sh

bench: venv
	.venv/bin/python -m bench.compare $(ARGS)

test: venv
	.venv/bin/python -m pytest -q $(ARGS)
