# moqae — common tasks. `make train` and `make test` set up a fresh machine themselves.
SHELL := /bin/bash
BIN := .build/release/moqae-train
CONFIG ?= configs/default.yaml
STORE ?= calibration/stores/synthetic-tiny
RUN_DIR ?= checkpoints/default
TRAIN_ARGS ?=

.PHONY: setup build store train test clean-run

## Install the system library the trainer links (OpenBLAS), if it is missing.
setup:
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libopenblas-dev pkg-config; }

build: setup
	swift build -c release --product moqae-train

## The default store: synthetic, in the reference model's shape (until the real dumper lands).
store: build
	@test -f $(STORE)/manifest.json || $(BIN) synth --shape tiny --sequences 256 --out $(STORE)

## Train on the default store (continuing the run if it exists), then export the router.
train: store
	$(BIN) train --config $(CONFIG) --set store=$(STORE) --set run_dir=$(RUN_DIR) \
	  $$(ls $(RUN_DIR)/ckpt-*.safetensors >/dev/null 2>&1 && echo --resume latest) $(TRAIN_ARGS)
	$(BIN) export $(RUN_DIR) --out $(RUN_DIR)/router.bin
	$(BIN) inspect $(RUN_DIR)/router.bin

## Every test (Swift Testing, debug build).
test: setup
	swift test

clean-run:
	rm -rf $(RUN_DIR)
