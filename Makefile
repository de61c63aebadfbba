# mgpumanager: run the demo, test, check, benchmark.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= tcp:8770:interface=127.0.0.1

.PHONY: run test check bench clean

# The editable install uses the "compat" mode: setuptools' default editable
# mode hides twisted/plugins from twistd's plugin discovery.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n --pidfile= mgpumanager --demo --listen '$(LISTEN)'

test: $(BIN)/.installed
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests

check: $(BIN)/.installed
	$(BIN)/mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BIN)/.installed
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp twisted/plugins/dropin.cache
