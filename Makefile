# Every target does its own set-up on a fresh machine: `make test`, `make serve` just work.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.entmtp-installed
PORT   ?= 30000
HOST   ?= 127.0.0.1
ARGS   ?=

.PHONY: install test test-all serve generate bench lint clean

install: $(STAMP)

# torch==2.13.0 resolves to a local CPU build on our machines; an unpinned torch would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m srt_entmtp.cli prepare
	touch $@

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q -ra tests $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: install
	ENTMTP_SLOW=1 $(PY) -m pytest -q -ra tests $(ARGS)

generate: install
	$(VENV)/bin/entmtp generate --chat --prompt "Write a Python function that checks whether a number is prime." $(ARGS)

serve: install
	$(VENV)/bin/entmtp serve --host $(HOST) --port $(PORT) $(ARGS)

bench: install
	$(PY) scripts/bench_forward.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check srt_entmtp tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
