# The commands of the README (make demo, make test, make demo-lanes, make demo-report). Each creates .venv
# when it is missing and installs the project into it with the test, report and ray extras, so a bare
# machine with only Python needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-lanes demo-report test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,report,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batch run jobs/demo.toml --fresh

# the batch lane against a deadline, on the simulator's Batch API (about 80 s)
demo-lanes: $(STAMP)
	$(BIN)/batch run jobs/overnight.toml --fresh
	$(BIN)/batch status out/overnight

# the demo on a bad night (per-second limit, 5xx, the first model down for 5 s), then its run report (~1 min)
demo-report: $(STAMP)
	$(BIN)/batch run jobs/demo-faults.toml --fresh
	$(BIN)/batch report out/demo-faults

# mypy --strict on batch/ first (a few seconds): a typing break fails `make test`, and so CI
test: $(STAMP)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
