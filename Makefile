# Stockade: the two commands a fresh Debian machine needs.
#   make run   installs system packages if missing, builds release, runs the built-in flash-sale demo
#   make test  installs the same, builds, runs every test

SWIFT ?= swift
DATA_DIR ?= ./data
APT_PACKAGES := liblz4-dev libjemalloc-dev pkg-config

.PHONY: run test deps build release bench clean

deps:
	@if ! pkg-config --exists liblz4 jemalloc 2>/dev/null; then \
		echo "installing $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

release: deps
	$(SWIFT) build -c release --product stockade

run: release
	.build/release/stockade demo --data-dir $(DATA_DIR)

build: deps
	$(SWIFT) build --product stockade

# The crash test starts .build/debug/stockade as a child process, so it is built first.
test: build
	STOCKADE_BIN=$(CURDIR)/.build/debug/stockade $(SWIFT) test

bench: deps
	$(SWIFT) package benchmark

clean:
	rm -rf .build
