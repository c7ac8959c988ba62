# The two commands of the README. Each creates/reuses .venv and installs what it needs.
#   make bench   -> python -m bench.compare (the main job)
#   make test    -> the whole test suite, on every core (pytest-xdist)
# Pass arguments with ARGS, e.g. `make bench ARGS="--quick"`.
.PHONY: bench test venv
venv:
	@bash scripts/venv.sh

# bench.compare itself defaults to --data / $CIFAKE_PATH only. On the project's machines
# the dataset sits beside the checkout: pass it unless CIFAKE_PATH is set (a --data in
# ARGS comes later on the command line, so it still wins). --quick uses the mini archive.
DEV_DATA := $(wildcard ../shared/data/cifake/$(if $(filter --quick,$(ARGS)),cifake-mini.zip,cifake.zip))
BENCH_DATA := $(if $(CIFAKE_PATH),,$(if $(DEV_DATA),--data $(DEV_DATA)))

bench: venv
	.venv/bin/python -m bench.compare $(BENCH_DATA) $(ARGS)

test: venv
	.venv/bin/python -m pytest -q -n auto $(ARGS)
