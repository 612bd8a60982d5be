# Stockade: the two commands a fresh Debian machine needs.
#   make run   installs what is missing, builds release, serves on 127.0.0.1:7379 (data in ./data)
#   make test  installs what is missing, builds, runs the Swift tests and the integration tests
#              against the real server process with redis-cli, redis-benchmark and redis-py, and the
#              sink (stockade-sink) against a PostgreSQL the tests start themselves

SWIFT ?= swift
PYTHON ?= python3
DATA_DIR ?= ./data
# postgresql: the sink's tests start a temporary cluster of their own (the package's default one is not used).
APT_PACKAGES := liblz4-dev libjemalloc-dev pkg-config redis-tools redis-server etcd-server postgresql
PIP_PACKAGES := redis pytest

.PHONY: run test deps build release bench demo simulate clean

deps:
	@if ! pkg-config --exists liblz4 jemalloc 2>/dev/null || ! command -v redis-cli >/dev/null || ! command -v redis-benchmark >/dev/null || ! command -v redis-server >/dev/null || ! command -v etcd >/dev/null \
		|| ! command -v psql >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@if ! $(PYTHON) -c "import redis, pytest" 2>/dev/null; then \
		echo "installing $(PIP_PACKAGES)"; \
		$(PYTHON) -m pip install -q $(PIP_PACKAGES); \
	fi

release: deps
	$(SWIFT) build -c release --product stockade

run: release
	.build/release/stockade serve --data-dir $(DATA_DIR) --metrics-port 9379

# In a temporary directory: the demo's sale must not land in the data `make run` serves.
demo: release
	.build/release/stockade demo

# The sink is its own product (PostgresNIO stays out of the server): `make run` never builds it.
build: deps
	$(SWIFT) build --product stockade
	$(SWIFT) build --product stockade-sink
	$(SWIFT) build --product stockade-ceiling

# The crash tests start .build/debug/stockade as a child process, so it is built first; the sink's
# tests start .build/debug/stockade-sink and stockade-ceiling beside it.
test: build
	STOCKADE_BIN=$(CURDIR)/.build/debug/stockade $(SWIFT) test
	STOCKADE_BIN=$(CURDIR)/.build/debug/stockade $(PYTHON) -m pytest -q tests/integration

# The deterministic simulator for a while (SIMULATE_SECONDS=600 by default, half on the in-memory log,
# half on the real journal over the simulated disk); `make test` runs a bounded set.
# A failing seed prints the command that replays it.
SIMULATE_SECONDS ?= 600
simulate: release
	.build/release/stockade simulate --seconds $$(( $(SIMULATE_SECONDS) / 2 )) --from $$(date +%s)
	.build/release/stockade simulate --disk --seconds $$(( $(SIMULATE_SECONDS) / 2 )) --from $$(date +%s)

bench: deps
	$(SWIFT) package benchmark

clean:
	rm -rf .build
