# `make run` and `make test` bootstrap everything on a fresh machine (Python 3.11, pip, make).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast e2e lint typecheck compose-config bench faults lock clean \
  in-process checks fast-tier postgres-tier

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Every install takes the versions pinned in requirements.lock (a constraints file:
# it pins, it adds nothing), so every machine and CI run gets the same releases.
# `make lock` moves the pins to the newest releases pyproject.toml allows.
LOCK := requirements.lock

# Stamp files: reinstall only when pyproject.toml or the lock changes.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[app]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[app,test]'
	touch $(VENV)/.installed $@

lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --all-extras --python-version 3.11 --upgrade -o $(LOCK)

run: $(VENV)/.installed
	$(BIN)/kinora up

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# The database's rules (claims, charges, refunds, idempotency, the event floor) run
# again on a throwaway PostgreSQL server that the tests start themselves (initdb and
# pg_ctl on 127.0.0.1): the in-process tests of those rules, not the mock's sleeping.
DB_TESTS := tests/core/test_db.py tests/jobs tests/worker/test_steps.py tests/api/test_videos.py \
  tests/faults/test_event_loss.py

# Each part of `make test` says how long it took.
timed = @t0=$$(date +%s); $(2) || exit $$?; echo "== $(1): $$(( $$(date +%s) - t0 )) s"

# The browser tests drive Debian's Chromium; install it when it is missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium \
	  || (DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update \
	      && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium)

# Debian packages of servers the tests start themselves, on 127.0.0.1: installed
# without starting the system's own service (policy-rc.d says no while apt runs).
define apt_quiet
	printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null
	$(SUDO) chmod +x /usr/sbin/policy-rc.d
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(1) \
	  || (DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -q \
	      && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(1)); \
	  status=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status
endef

# The tests of a Redis that fails over run Debian's Redis 7 (a primary, a replica and
# three Sentinels, each started by the test on 127.0.0.1); installed when missing.
REDIS_SENTINEL := /usr/bin/redis-sentinel

$(REDIS_SENTINEL):
	$(call apt_quiet,redis-server redis-sentinel)

# The rolling restart runs behind Debian's nginx (deploy/nginx/kinora.conf); the page of
# twenty streams over HTTPS and HTTP/2 (kinora-https.conf) has openssl make its
# certificate.
NGINX := /usr/sbin/nginx
OPENSSL := /usr/bin/openssl

$(NGINX):
	$(call apt_quiet,nginx)

$(OPENSSL):
	$(call apt_quiet,openssl)

# docker-compose.yml is checked by compose itself wherever the docker client is
# installed (no engine needed): with its compose plugin, or else with Debian's
# docker-compose, installed here when missing. tests/test_deploy.py checks the file
# everywhere.
compose-config:
	@if ! command -v docker >/dev/null 2>&1; then \
	  echo "no docker client: docker-compose.yml checked by tests/test_deploy.py only"; \
	elif docker compose version >/dev/null 2>&1; then \
	  docker compose config --quiet && echo "docker-compose.yml: valid (docker compose)"; \
	else \
	  command -v docker-compose >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q docker-compose >/dev/null \
	    || (DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -q >/dev/null \
	        && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q docker-compose >/dev/null); \
	  docker-compose config --quiet && echo "docker-compose.yml: valid (docker-compose)"; \
	fi

# The fast tier: in-process (the steps against the mock engine, the hub against a real
# Redis, the API through an in-process client), no worker, no uvicorn: under a minute.
test-fast: $(VENV)/.installed-test
	$(call timed,fast tier,$(BIN)/pytest -m "not slow" --durations=5)

# The end-to-end tier in two halves at once: its tests mostly wait (on processes
# starting, on timeouts, on faults taking effect: about a third of two cores is busy
# when it runs whole), and each half is a pytest session of its own, with its own
# Redis, database, stack and ports. The half that breaks processes on purpose runs
# beside the rest; its log is printed when both are done.
E2E_FAULTS := tests/faults tests/test_bench.py tests/test_scale.py
e2e: $(VENV)/.installed-test $(CHROMIUM) $(REDIS_SENTINEL) $(NGINX) $(OPENSSL)
	@$(BIN)/pytest -m slow $(E2E_FAULTS) --durations=10 > $(VENV)/e2e-faults.log 2>&1 & faults=$$!; \
	$(BIN)/pytest -m slow $(E2E_FAULTS:%=--ignore=%) --durations=10; rest=$$?; \
	wait $$faults; faulted=$$?; echo "== the faults half:"; cat $(VENV)/e2e-faults.log; \
	[ $$rest = 0 ] && [ $$faulted = 0 ]

# Everything: lint, types, both tiers on SQLite, the database's rules on PostgreSQL.
# The checks and the in-process tiers run at once (`in-process`), then the end-to-end
# tier.
test: $(VENV)/.installed-test $(CHROMIUM) $(REDIS_SENTINEL) $(NGINX) $(OPENSSL)
	$(call timed,checks and in-process tiers,$(MAKE) --no-print-directory in-process)
	$(call timed,end-to-end tier,$(MAKE) --no-print-directory e2e)

# The checks (lint, types, compose), the fast tier and the database's rules on
# PostgreSQL, three at once: each is one process that computes and none waits on
# another (one after another they took two minutes). make prints each one's output
# whole when it ends; any that fails fails the run.
IN_PROCESS := checks fast-tier postgres-tier
in-process: $(VENV)/.installed-test
	@$(MAKE) --no-print-directory -j3 --output-sync=target $(IN_PROCESS)

checks: $(VENV)/.installed-test
	$(call timed,lint,$(MAKE) --no-print-directory lint)
	$(call timed,typecheck,$(MAKE) --no-print-directory typecheck)
	$(call timed,compose check,$(MAKE) --no-print-directory compose-config)

fast-tier: $(VENV)/.installed-test
	$(call timed,fast tier,$(BIN)/pytest -m "not slow" --durations=5)

postgres-tier: $(VENV)/.installed-test
	$(call timed,PostgreSQL,KINORA_TEST_DB=postgres $(BIN)/pytest $(DB_TESTS) --durations=5)

# The benchmarks (minutes; each prints one JSON object). Figures in README.
bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.storm
	$(BIN)/python -m bench.burst
	$(BIN)/python -m bench.http2
	$(BIN)/python -m bench.cores
	$(BIN)/python -m bench.baseline
	$(BIN)/python -m bench.many
	$(BIN)/python -m bench.drain
	$(BIN)/python -m bench.shards
	$(BIN)/python -m bench.rolling
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.recovery

# Fault injection in randomized rounds against real processes (tens of minutes); prints
# a line per round and a table. `make test` runs one round of each fault.
faults: $(VENV)/.installed-test $(REDIS_SENTINEL)
	$(BIN)/python -m tests.faults.chaos --rounds $${ROUNDS:-200}
	$(BIN)/python -m tests.faults.chaos --sentinel --rounds $${SENTINEL_ROUNDS:-50}

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
