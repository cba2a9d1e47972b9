# The two commands of the README:
#   make sample   run the order pipeline sample on the in-memory binder
#   make test     install everything into .venv and run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
BINDERS := $(wildcard binders/*/pyproject.toml)
STAMP := $(VENV)/.installed

.PHONY: install test sample lint typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml $(BINDERS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,ops,otel]' \
		$(foreach b,$(BINDERS),-e '$(dir $(b))[test]')
	touch $(STAMP)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

sample: install
	cd samples/orders && ../../$(BIN)/streamkit run app:app

lint: install
	$(BIN)/ruff check streamkit binders tests samples
	$(BIN)/ruff format --check streamkit binders tests samples

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
