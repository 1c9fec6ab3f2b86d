# edgekit: `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The device's venv: edgekit[agent-tflite] without TensorFlow (make test-agent-lean).
LEAN := .venv-lean
LEAN_STAMP := $(LEAN)/.installed
THIRD_PARTY := .cache/third-party
# A real third-party .tflite shipped inside a PyPI package, used by the bundle round-trip tests.
THIRD_PARTY_WHEEL := mediapipe==0.10.14
# The device agent's dependencies as wheels, so tests can run examples/raspberry-pi/install.sh
# offline (PIP_NO_INDEX=1 PIP_FIND_LINKS=$(WHEELHOUSE)); edgekit itself is built by the test.
WHEELHOUSE := .cache/wheelhouse

.PHONY: setup test test-arm lint typecheck pytest demo mosquitto rabbitmq chromium shellcheck clean py39 test-agent-lean check-examples docs lock audit fuzz soak

setup: $(STAMP) mosquitto rabbitmq chromium shellcheck $(THIRD_PARTY)/.fetched $(WHEELHOUSE)/.fetched py39

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c requirements.lock -e ".[all,dev]" --config-settings editable_mode=strict
	touch $@

# Installs Mosquitto when it is missing and we can (root with apt); tests start their own brokers.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing mosquitto (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	  else echo "mosquitto is missing: install it (e.g. sudo apt-get install mosquitto)"; exit 1; fi; }

# RabbitMQ (Debian's rabbitmq-server) for the broker matrix (tests/fleet/test_broker_matrix.py):
# installed like Mosquitto, and started when it is not running. The tests enable its MQTT plugin
# on a free port of their own and disable it again; they leave the rest of the node alone.
rabbitmq:
	@command -v rabbitmqctl >/dev/null 2>&1 || test -x /usr/sbin/rabbitmqctl || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing rabbitmq-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; \
	  else echo "rabbitmq-server is missing: install it (e.g. sudo apt-get install rabbitmq-server)"; exit 1; fi; }
	@PATH="$$PATH:/usr/sbin"; rabbitmqctl -q status >/dev/null 2>&1 || { \
	  echo "starting rabbitmq-server"; rabbitmq-server -detached && rabbitmqctl -q await_startup; }

$(THIRD_PARTY)/.fetched:
	mkdir -p $(THIRD_PARTY)
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
	  -d $(THIRD_PARTY) "$(THIRD_PARTY_WHEEL)"
	touch $@

# The dashboard tests load pages in headless Chromium (Debian's package); installed like Mosquitto.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it (e.g. sudo apt-get install chromium)"; exit 1; fi; }

# shellcheck (Debian's package) for `make check-examples`; installed like Mosquitto.
shellcheck:
	@command -v shellcheck >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing shellcheck (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; \
	  else echo "shellcheck is missing: install it (e.g. sudo apt-get install shellcheck)"; exit 1; fi; }

$(WHEELHOUSE)/.fetched: $(STAMP)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)/self
	$(PIP) wheel --quiet --no-deps --no-build-isolation -w $(WHEELHOUSE)/self . >/dev/null 2>&1
	for extra in agent agent-tflite; do \
	  $(PIP) download --quiet --only-binary=:all: -d $(WHEELHOUSE) "$$(ls $(WHEELHOUSE)/self/edgekit-*.whl)[$$extra]" || exit 1; \
	done
	rm -rf $(WHEELHOUSE)/self $(WHEELHOUSE)/edgekit-*.whl
	touch $@

# Every shell script passes bash -n and shellcheck; the systemd unit passes systemd-analyze
# verify (with ExecStart pointed at this venv's agent, which must exist for the check).
EXAMPLE_SCRIPTS = $(shell find examples -name '*.sh' -type f | sort)
UNIT := examples/raspberry-pi/edgekit-agent.service
check-examples: shellcheck $(STAMP)
	@for script in $(EXAMPLE_SCRIPTS); do bash -n "$$script" || exit 1; done
	shellcheck $(EXAMPLE_SCRIPTS)
	@if command -v systemd-analyze >/dev/null 2>&1; then \
	  mkdir -p .cache/unit-check && \
	  sed "s|/opt/edgekit/bin/|$(CURDIR)/$(VENV)/bin/|" $(UNIT) > .cache/unit-check/edgekit-agent.service && \
	  out="$$(systemd-analyze verify .cache/unit-check/edgekit-agent.service 2>&1)"; \
	  if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	  echo "systemd-analyze verify: $(UNIT) OK"; \
	else echo "SKIPPED: systemd-analyze is not installed (Debian package systemd); $(UNIT) not verified"; fi

# docs/cli-reference.md is generated from the CLI itself; tests/docs fails when it is stale.
docs: $(STAMP)
	$(PY) docs/gen_cli.py
	$(PY) docs/gen_alert_samples.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	# New modules must be linked into the strict editable tree before mypy can see them.
	$(PIP) install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	$(VENV)/bin/mypy

# The lean venv first: its tflite-runtime agent is a board class of its own in
# tests/fleet/test_bench_fleet.py.
pytest: setup $(LEAN_STAMP)
	$(PIP) install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	$(VENV)/bin/pytest -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test: setup lint typecheck audit check-examples pytest test-agent-lean test-arm
test: AUDIT_ALLOW_UNREACHABLE = 1

# The lock: every dependency of edgekit[all,dev] as pip resolves it, pinned (edgekit excluded).
lock:
	$(PIP) install --quiet --dry-run --ignore-installed --report .cache/lock-report.json -e ".[all,dev]"
	$(PY) tests/audit_lock.py lock .cache/lock-report.json requirements.lock

# pip-audit of the lock against PyPI's vulnerability data: fails on a known vulnerability (or
# on data it could not fetch, unless AUDIT_ALLOW_UNREACHABLE=1, as `make test` sets it: this
# machine's egress does not reach pypi.org's per-release JSON nor api.osv.dev).
AUDIT_ALLOW_UNREACHABLE ?= 0
audit: $(STAMP)
	$(PIP) install --quiet "pip-audit>=2.7"
	mkdir -p .cache
	$(VENV)/bin/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off \
	  -f json -o .cache/audit.json || true
	AUDIT_ALLOW_UNREACHABLE=$(AUDIT_ALLOW_UNREACHABLE) $(PY) tests/audit_lock.py check .cache/audit.json


# The device environment: tflite-runtime 2.14 with numpy<2 and NO TensorFlow, running the agent
# tests. Models cannot be trained there, so the main venv exports the same digits models to
# .cache/agent-models first (tests/agent/export_models.py); nothing binary is committed.
AGENT_MODELS := .cache/agent-models

$(LEAN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LEAN)
	$(LEAN)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(LEAN)/bin/python -m pip install --quiet -e ".[agent-tflite]" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" \
	  --config-settings editable_mode=strict
	touch $@

$(AGENT_MODELS)/.complete: $(STAMP) tests/conftest.py tests/agent/export_models.py
	$(PY) tests/agent/export_models.py $(AGENT_MODELS)

test-agent-lean: $(LEAN_STAMP) $(AGENT_MODELS)/.complete
	$(LEAN)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	@$(LEAN)/bin/python -c "import importlib.util as u, sys; sys.exit('TensorFlow must not be in $(LEAN)' if u.find_spec('tensorflow') else 0)"
	EDGEKIT_TEST_MODELS=$(AGENT_MODELS) $(LEAN)/bin/pytest -p no:cacheprovider tests/agent \
	  $(wildcard tests/faults/test_agent_*.py) $(PYTEST_ARGS)

# The emulated ARM lane (tests/arm): Debian bookworm arm64 built with mmdebstrap (cached in
# ~/.cache/edgekit/arm64-bookworm, keyed by what goes in, shared by clones) and run through qemu-user: install.sh with the
# arm64 LiteRT wheel, bundles made here installed and predicting like x86 (Pi 4 and Pi 5 CPUs), `edgekit-agent run`
# taking a `push --wait`; and Debian bullseye armhf (cached beside it in ~/.cache/edgekit/armhf-bullseye):
# the 32-bit route with Debian's numpy and tflite-runtime 2.11.0. Needs root, mmdebstrap, qemu-user-static and binfmt_misc (.ci/run
# installs them); where they are missing it says SKIPPED and passes.
test-arm: $(STAMP) $(THIRD_PARTY)/.fetched $(AGENT_MODELS)/.complete
	@if reason=$$($(PY) tests/arm/board.py check); then \
	  $(PY) tests/arm/board.py build >/dev/null && \
	  EDGEKIT_TEST_MODELS=$(AGENT_MODELS) $(VENV)/bin/pytest -p no:cacheprovider tests/arm $(PYTEST_ARGS); \
	else \
	  echo "********************************************************************************"; \
	  echo "SKIPPED: the ARM lane (tests/arm) cannot run here: $$reason"; \
	  echo "********************************************************************************"; \
	fi

demo: $(STAMP)
	$(PY) examples/quickstart/demo.py

clean:
	rm -rf $(VENV) build .cache .mypy_cache .ruff_cache .pytest_cache

# Devices run older Pythons: a 3.9 venv with the sdk's light dependencies, for tests/test_layout.py.
PY39 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(shell command -v python3.9 2>/dev/null))
py39: .venv-py39/.installed
.venv-py39/.installed: pyproject.toml
	@test -n "$(PY39)" || { echo "no Python 3.9 found: set PY39=/path/to/python3.9"; exit 1; }
	$(PY39) -m venv .venv-py39
	# Installing the package pulls exactly the sdk's declared dependencies; the test imports the
	# current sources from a copy laid out like the package, ahead of this installed snapshot.
	.venv-py39/bin/python -m pip install --quiet ".[cli]"
	touch $@

# Fuzz every wire decoder, the bundle reader and the agent's state files for FUZZ_SECONDS in all
# (split over the targets) with atheris (libFuzzer); with hypothesis where atheris does not
# install. Corpus and crashes in .cache/fuzz.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP) $(AGENT_MODELS)/.complete
	$(PIP) install --quiet atheris || echo "atheris does not install here: fuzzing with hypothesis"
	$(PY) tests/fuzz_run.py --seconds $(FUZZ_SECONDS) --model $(AGENT_MODELS)/digits_fp32.tflite \
	  --data $(AGENT_MODELS)/digits_test.npz --out .cache/fuzz

# Soak (not part of `make test`): 50 real agents in 5 processes, `edgekit fleet serve` and a
# Mosquitto of its own for SOAK_SECONDS, with pushes, rollbacks and canary aborts; fails unless
# nothing was lost or stored twice and every process's memory stayed flat. Report in .cache/soak.json.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PIP) install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS) --out .cache/soak.json $(SOAK_ARGS)
