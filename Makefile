# Two commands matter: `make run` and `make test`. Both create .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lock bench clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/teleledger serve

test: $(STAMP)
	$(VENV)/bin/pytest

# re-pin every dependency after changing pyproject.toml
lock: $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip freeze --exclude-editable | grep -v '^teleledger' > requirements.lock

clean:
	rm -rf $(VENV) var
