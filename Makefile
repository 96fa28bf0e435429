# make demo: set up everything, then run the pipeline on the `small` preset.
# make test: set up if needed, then run the test suite (make test-fast: the unit tests only).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PRESET ?= small

.PHONY: demo test test-fast venv clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m mome_ray.cli pipeline --config configs/$(PRESET).yaml

# pytest exits 5 when it collected no test: that is a failure, said out loud.
# test: everything (CI; the `cluster` tests need root). test-fast: the unit tests only, under a minute.
PYTEST = PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

test: venv
	$(PYTEST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: venv
	$(PYTEST) -m unit $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; exit $$rc

bench: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/router_vs_langid.py --run-dir runs/$(PRESET)

clean:
	rm -rf runs .pytest_cache
