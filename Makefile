# mgpumanager: run the demo, test, check, benchmark.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= tcp:8770:interface=127.0.0.1
DEMO_GPUS ?= 1

.PHONY: run test check fuzz bench gpu-check clean deploy

# The working tree is put on the venv's path (a .pth file) rather than
# installed: code changes need no reinstall, twistd finds twisted/plugins in
# the tree, and no editable-install mode (each prints warnings, and the one
# that keeps twisted/plugins visible is being removed) is involved. Only the
# dependencies are installed; `mgpu` gets a launcher. `pip install .` (the
# wheel, as make deploy does) is what users get.
define DEPENDENCIES
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + [d for e in sys.argv[1:] for d in extras[e]]))
endef
define TREE_ON_PATH
import pathlib, site, sys
pathlib.Path(site.getsitepackages()[0], "mgpumanager-tree.pth").write_text(sys.argv[1] + "\n")
launcher = pathlib.Path(sys.prefix, "bin", "mgpu")
launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom mgpu.cli import main\nsys.exit(main())\n")
launcher.chmod(0o755)
endef
export DEPENDENCIES TREE_ON_PATH

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "$$DEPENDENCIES" test > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt
	$(BIN)/python -c "$$TREE_ON_PATH" '$(CURDIR)'
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n --pidfile= mgpumanager --demo --demo-gpus '$(DEMO_GPUS)' --listen '$(LISTEN)'

test: $(BIN)/.installed
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests

check: $(BIN)/.installed
	$(BIN)/mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# make fuzz: the property tests on hostile input and the queue's oracle, with
# thousands of generated examples each (make test runs a few hundred at most).
FUZZ_TESTS := tests.test_config_hostile tests.test_upstream tests.test_spool tests.test_tunnel \
	tests.test_waitqueue tests.test_procs tests.test_openai_api tests.test_ollama tests.test_cards \
	tests.integration.test_hostile
fuzz: $(BIN)/.installed
	MGPU_FUZZ_EXAMPLES=$${MGPU_FUZZ_EXAMPLES:-5000} $(BIN)/python -m twisted.trial $(FUZZ_TESTS)

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -c "$$DEPENDENCIES" bench > $(VENV)/requirements-bench.txt
	$(BIN)/pip install -q -r $(VENV)/requirements-bench.txt
	touch $@

# make bench [BENCH="trace --seed 2"]: what python -m bench runs (default: latency,
# throughput, evict, scale; the trace replay takes minutes and runs only when named).
bench: $(BIN)/.bench-installed
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
	$(BIN)/python -m bench $(BENCH)

# make gpu-check [GPU_CHECK="--gpu 1 --keep"]: on a machine with an NVIDIA card, the
# per-process memory that /v1/status reports against nvidia-smi (bench/README.md,
# "gpu-check"); where there is no card it prints one "skipped" line and exits 0.
gpu-check: $(BIN)/.installed
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK)

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp twisted/plugins/dropin.cache

# make deploy HOST=user@host: install this tree on HOST under systemd. The
# user needs sudo there (or is root). Copies the source to $(DEPLOY_DIR),
# builds its venv, installs the units, and (re)starts the daemon; an existing
# /etc/mgpumanager/consumers.yaml is kept, a missing one is copied from config/.
DEPLOY_DIR := /opt/mgpumanager
DEPLOY_SUDO := $$([ "$$(id -u)" = 0 ] || echo sudo)
deploy:
	$(if $(HOST),,$(error HOST is not set: use make deploy HOST=user@host))
	ssh $(HOST) 'set -e; S=$(DEPLOY_SUDO); \
		id -u mgpumanager >/dev/null 2>&1 || $$S useradd --system --user-group \
			--home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin mgpumanager; \
		$$S mkdir -p $(DEPLOY_DIR) /etc/mgpumanager; $$S chown "$$(id -un)" $(DEPLOY_DIR)'
	rsync -rlptz --delete --exclude .venv --exclude .git --exclude '_trial_temp*' \
		--exclude bench/out --exclude '*.egg-info' --exclude build --exclude dist \
		--exclude dropin.cache --exclude __pycache__ ./ '$(HOST):$(DEPLOY_DIR)/'
	ssh $(HOST) 'set -e; S=$(DEPLOY_SUDO); cd $(DEPLOY_DIR); \
		python3 -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q .; \
		.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"; \
		[ -e /etc/mgpumanager/consumers.yaml ] || $$S install -m 0644 config/consumers.yaml /etc/mgpumanager/; \
		$$S install -m 0644 config/mgpumanager.service config/mgpumanager.socket /etc/systemd/system/; \
		$$S systemctl daemon-reload; \
		$$S systemctl enable --now mgpumanager.socket; \
		$$S systemctl restart mgpumanager.service'
