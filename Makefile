# moqae — common tasks. `make train` and `make test` set up a fresh machine themselves.
SHELL := /bin/bash
BIN := .build/release/moqae-train
CONFIG ?= configs/default.yaml
STORE ?= calibration/wt2-byte-llama
VENV := python/.venv
PY := $(VENV)/bin/python
MOQAE := $(VENV)/bin/moqae
RUN_DIR ?= checkpoints/default
TRAIN_ARGS ?=

.PHONY: install test-triton test-newest-transformers passkey-needle ablation ablation-passkey ablation-perplexity benchmark device-check serve-benchmark serve-passkey sensitivity-benchmark length-benchmark passkey passkey-store pareto-passkey setup venv build store train pareto test clean-run fuzz fuzz-build soak

## The Triton kernel of packed attention, run by Triton's interpreter on the CPU against a float64 brute
## force (installs python/requirements-triton.txt into the venv; the CPU install does not need it).
test-triton: venv
	$(PY) -m pip install -q -r python/requirements-triton.txt
	TRITON_INTERPRET=1 $(PY) -m pytest -q python/tests/test_triton_attention.py

## The serving tests against the newest transformers the package registry serves (the venv keeps the pinned
## TARGET one; the newest goes to NEWEST_TRANSFORMERS and comes first on the path): the optional CI step.
NEWEST_TRANSFORMERS ?= checkpoints/newest-transformers
test-newest-transformers: venv
	$(PY) -m pip install -q --upgrade --target $(NEWEST_TRANSFORMERS) transformers
	cd python && PYTHONPATH=../$(NEWEST_TRANSFORMERS) ../$(PY) -m pytest -q tests/test_cache.py tests/test_cache_generation.py \
	  tests/test_packed_attention.py tests/test_capture.py tests/test_sliding_window.py -k "not pinned_transformers"

## Install the system library the trainer links (OpenBLAS), if it is missing.
setup:
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libopenblas-dev pkg-config; }

## A virtual environment with the pinned Python packages of python/requirements.txt and the moqae package
## installed from python/ in development mode (`pip install -e`: the venv's `moqae` runs this checkout's code).
venv: $(PY)
$(PY): python/requirements.txt python/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r python/requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e ./python
	touch $(PY)

## moqae-train on the PATH: PREFIX/bin (default ~/.local/bin, /usr/local/bin as root).
PREFIX ?= $(if $(filter 0,$(shell id -u)),/usr/local,$(HOME)/.local)
install: build
	install -d $(PREFIX)/bin
	install -m 755 $(BIN) $(PREFIX)/bin/moqae-train
	@echo "installed $(PREFIX)/bin/moqae-train"

build: setup
	swift build -c release --product moqae-train

## The default store: the reference byte-level Llama's keys on WikiText-2 valid.txt (10% of its
## 512-byte windows: the calibration and validation splits). An interrupted dump is resumed.
store: venv
	@if [ ! -f $(STORE)/manifest.json ]; then \
	  $(MOQAE) dump --model models/wt2-byte-llama --corpus models/wikitext-2/valid.txt \
	    --tokenizer bytes --out $(STORE) $$([ -f $(STORE)/dump-state.json ] && echo --resume); fi

## Train on the default store (continuing the run if it exists), then export the router.
train: build store
	$(BIN) train --config $(CONFIG) --set store=$(STORE) --set run_dir=$(RUN_DIR) \
	  $$(ls $(RUN_DIR)/ckpt-*.safetensors >/dev/null 2>&1 && echo --resume latest) $(TRAIN_ARGS)
	$(BIN) export $(RUN_DIR) --out $(RUN_DIR)/router.bin
	$(BIN) inspect $(RUN_DIR)/router.bin

## Routers of the paper's loss at λ = 0.1 … 0.9 and of the PARETO_CONFIGS (the expected loss under
## bits budgets), scored by real perplexity on the first PARETO_WINDOWS windows of WikiText-2
## test.txt beside every baseline: PARETO_OUT/pareto.{json,md,png}.
PARETO_OUT ?= checkpoints/pareto
PARETO_WINDOWS ?= 600
PARETO_CONFIGS ?= configs/budget-3.5.yaml configs/budget-4.1.yaml
PARETO_ARGS ?=
pareto: build store
	$(MOQAE) pareto --moqae-train $(BIN) --config $(CONFIG) --store $(STORE) \
	  --model models/wt2-byte-llama --text models/wikitext-2/test.txt --tokenizer bytes \
	  --out $(PARETO_OUT) --max-windows $(PARETO_WINDOWS) $(addprefix --config-run ,$(PARETO_CONFIGS)) $(PARETO_ARGS)

## The pass-key model, end to end at 2,048 bytes: a store of every 2,048-byte window of valid.txt, half
## of them with a needle (`make passkey-store`); routers under PASSKEY_CONFIG's bits budget; then
## pass-key accuracy and bits per byte of every plan on PASSKEY_WINDOWS needle windows of test.txt.
PASSKEY_MODEL ?= models/passkey-byte-llama
PASSKEY_STORE ?= calibration/passkey-byte-llama
PASSKEY_SEQ_LEN ?= 2048
PASSKEY_CONFIG ?= configs/passkey-3.0.yaml
PASSKEY_RUN_DIR ?= checkpoints/passkey
PASSKEY_WINDOWS ?= 200
PASSKEY_ANSWER_WEIGHT ?= 400
PASSKEY_ROUTER_INPUT ?= key
PASSKEY_FRACTION ?= 1
## The store's calibration split, on which eval fits the static and layer-wise plans.
PASSKEY_CALIBRATION_FRACTION ?= 0.05
## Extra dump options, e.g. "--background int2 --exact-answers" (sensitivities around a plan: `make passkey-needle`).
PASSKEY_DUMP_ARGS ?=
PASSKEY_TRAIN_ARGS ?=
## Content-blind per-layer plans `make passkey` also scores: layer 0 at int4 keeps the key (docs/router-variants.md).
PASSKEY_LAYER_PLANS ?= int4,int2,int2,int2
## With a target, `make passkey` lands the exported router on it (`moqae calibrate-bits` on needle windows
## of valid.txt) and evaluates that export.
PASSKEY_TARGET_BITS ?=
PASSKEY_ROUTER = $(PASSKEY_RUN_DIR)/router$(if $(PASSKEY_TARGET_BITS),-$(PASSKEY_TARGET_BITS)).bin
passkey-store: venv
	@if [ ! -f $(PASSKEY_STORE)/manifest.json ]; then \
	  $(MOQAE) dump --model $(PASSKEY_MODEL) --corpus models/wikitext-2/valid.txt --tokenizer bytes \
	    --seq-len $(PASSKEY_SEQ_LEN) --fraction $(PASSKEY_FRACTION) --passkey 0.5 --answer-weight $(PASSKEY_ANSWER_WEIGHT) --router-input $(PASSKEY_ROUTER_INPUT) \
	    --out $(PASSKEY_STORE) $(PASSKEY_DUMP_ARGS) \
	    $$([ -f $(PASSKEY_STORE)/dump-state.json ] && echo --resume); fi
passkey: build passkey-store
	$(BIN) train --config $(PASSKEY_CONFIG) --set store=$(PASSKEY_STORE) --set run_dir=$(PASSKEY_RUN_DIR) \
	  $$(ls $(PASSKEY_RUN_DIR)/ckpt-*.safetensors >/dev/null 2>&1 && echo --resume latest) $(PASSKEY_TRAIN_ARGS)
	$(BIN) export $(PASSKEY_RUN_DIR) --out $(PASSKEY_RUN_DIR)/router.bin
	$(if $(PASSKEY_TARGET_BITS),rm -f $(PASSKEY_ROUTER) && $(MOQAE) calibrate-bits --model $(PASSKEY_MODEL) \
	  --text models/wikitext-2/valid.txt --tokenizer bytes --seq-len $(PASSKEY_SEQ_LEN) --task passkey --max-windows 64 \
	  --router $(PASSKEY_RUN_DIR)/router.bin --out $(PASSKEY_ROUTER) --target-bits $(PASSKEY_TARGET_BITS))
	$(MOQAE) eval --model $(PASSKEY_MODEL) --text models/wikitext-2/test.txt --tokenizer bytes \
	  --seq-len $(PASSKEY_SEQ_LEN) --task passkey --max-windows $(PASSKEY_WINDOWS) --router $(PASSKEY_ROUTER) \
	  --store $(PASSKEY_STORE) --calibration-fraction $(PASSKEY_CALIBRATION_FRACTION) $(addprefix --layer-plan ,$(PASSKEY_LAYER_PLANS))

## The router that reads the needle: sensitivities measured around the deployed int2 plan with the answers'
## part exact (half of valid.txt's 2,048-byte windows: 98 minutes on 2 cores), a 2.4-bit budget, then `make
## passkey`'s evaluation with the content-blind layer plans near those bits (docs/router-variants.md).
NEEDLE_STORE ?= calibration/passkey-bg-int2
NEEDLE_CONFIG ?= configs/passkey-needle-2.4.yaml
NEEDLE_RUN_DIR ?= checkpoints/passkey-needle
passkey-needle:
	$(MAKE) passkey PASSKEY_STORE=$(NEEDLE_STORE) PASSKEY_CONFIG=$(NEEDLE_CONFIG) PASSKEY_RUN_DIR=$(NEEDLE_RUN_DIR) \
	  PASSKEY_FRACTION=0.5 PASSKEY_CALIBRATION_FRACTION=0.3 PASSKEY_DUMP_ARGS="--background int2 --exact-answers" PASSKEY_TARGET_BITS=2.45 \
	  PASSKEY_LAYER_PLANS="k4v2,int2,int2,int2 k2v4,int2,int2,int2 int4,int2,int2,int2"

## Router variants against the static and layer-wise plans at the same bits, each variant a config
## override (docs/router-variants.md): on the pass-key model (PASSKEY_CONFIG, ABLATION_WINDOWS needle
## windows; also max pooling at seeds 1 and 2) and the perplexity model (PARETO_CONFIGS,
## ABLATION_PPL_WINDOWS windows of test.txt):
## ABLATION_OUT/{passkey,perplexity}/pareto.{json,md,png}.
ABLATION_OUT ?= checkpoints/ablation
ABLATION_VARIANTS ?= router.pooling=vote router.pooling=mean router.pooling=max router.pooling=max,router.hidden_width=16
ABLATION_WINDOWS ?= 100
ABLATION_PASSKEY_VARIANTS ?= $(ABLATION_VARIANTS) router.pooling=max,seed=1 router.pooling=max,seed=2
ABLATION_PPL_WINDOWS ?= 300
ablation: ablation-passkey ablation-perplexity
ablation-passkey: build passkey-store
	$(MOQAE) pareto --moqae-train $(BIN) --config $(PASSKEY_CONFIG) --store $(PASSKEY_STORE) --lambdas= --no-diagnostics \
	  --model $(PASSKEY_MODEL) --text models/wikitext-2/test.txt --tokenizer bytes --task passkey \
	  --calibration-fraction 0.6 --out $(ABLATION_OUT)/passkey --max-windows $(ABLATION_WINDOWS) \
	  $(foreach v,$(ABLATION_PASSKEY_VARIANTS),--config-run $(PASSKEY_CONFIG):$(v))
ablation-perplexity: build store
	$(MOQAE) pareto --moqae-train $(BIN) --config $(CONFIG) --store $(STORE) --lambdas= --no-diagnostics \
	  --model models/wt2-byte-llama --text models/wikitext-2/test.txt --tokenizer bytes \
	  --out $(ABLATION_OUT)/perplexity --max-windows $(ABLATION_PPL_WINDOWS) \
	  $(foreach c,$(PARETO_CONFIGS),$(foreach v,$(ABLATION_VARIANTS),--config-run $(c):$(v)))

## Pass-key accuracy and bits per byte against average bits for routers under PASSKEY_PARETO_CONFIGS
## and every baseline, on the pass-key model: PASSKEY_PARETO_OUT/pareto.{json,md,png}. Beside them the
## content-blind frontier: every per-layer plan over LAYER_PLAN_EXPERTS scored on LAYER_PLAN_WINDOWS needle
## windows of valid.txt (LAYER_PLANS/layer-plans.{json,md}, made once), and the best at each bits level
## scored on the test windows.
PASSKEY_PARETO_OUT ?= checkpoints/pareto-passkey
PASSKEY_PARETO_CONFIGS ?= configs/passkey-2.5.yaml configs/passkey-3.0.yaml configs/passkey-4.0.yaml
PASSKEY_PARETO_ARGS ?=
LAYER_PLANS ?= checkpoints/layer-plans
LAYER_PLAN_EXPERTS ?= int4,int2,k4v2,k2v4
LAYER_PLAN_WINDOWS ?= 64
pareto-passkey: build passkey-store $(LAYER_PLANS)/layer-plans.json
	$(MOQAE) pareto --moqae-train $(BIN) --config $(PASSKEY_CONFIG) --store $(PASSKEY_STORE) --lambdas= \
	  --model $(PASSKEY_MODEL) --text models/wikitext-2/test.txt --tokenizer bytes --task passkey \
	  --calibration-fraction 0.6 --out $(PASSKEY_PARETO_OUT) --max-windows $(PASSKEY_WINDOWS) \
	  --layer-plans $(LAYER_PLANS)/layer-plans.json $(addprefix --config-run ,$(PASSKEY_PARETO_CONFIGS)) $(PASSKEY_PARETO_ARGS)
$(LAYER_PLANS)/layer-plans.json: | venv
	$(MOQAE) layer-plan-search --model $(PASSKEY_MODEL) --text models/wikitext-2/valid.txt --out $(LAYER_PLANS) \
	  --experts $(LAYER_PLAN_EXPERTS) --windows $(LAYER_PLAN_WINDOWS)

## Dump time and peak memory at T = 512, 1,024 and 2,048 bytes on the pass-key model, and 4,096 and
## 8,192 on a tiny random Llama: the "Dumps at length" section of BENCH_OUT.
length-benchmark: venv
	$(MOQAE) length-benchmark --model $(PASSKEY_MODEL) --corpus models/wikitext-2/valid.txt --out $(BENCH_OUT)

## On a CUDA machine: dump and evaluation of 4 windows of 4,096 tokens on a random Llama-2-7B-shaped model in
## bfloat16, per window time and peak GPU memory: the "On a GPU" section of BENCH_OUT. The venv pins torch's CPU
## build: install the CUDA one first (python/.venv/bin/pip install torch==2.13.0).
device-check: venv
	$(MOQAE) device-check --corpus models/wikitext-2/valid.txt --out $(BENCH_OUT)

## Serving: greedy pass-key answers through MoQAECache by plan (the router, uniform fp16/int4/int2 and
## PASSKEY_LAYER_PLANS) on SERVE_WINDOWS needle windows, with the router that `make passkey` trains.
SERVE_WINDOWS ?= 50
SERVE_ROUTER ?= $(PASSKEY_RUN_DIR)/router.bin
serve-passkey: venv
	@[ -f $(SERVE_ROUTER) ] || { echo "$(SERVE_ROUTER): no router export; run make passkey first" >&2; exit 1; }
	$(MOQAE) serve-passkey --model $(PASSKEY_MODEL) --router $(SERVE_ROUTER) --text models/wikitext-2/test.txt \
	  --windows $(SERVE_WINDOWS) --seq-len $(PASSKEY_SEQ_LEN) $(addprefix --layer-plan ,$(PASSKEY_LAYER_PLANS))

## Prefill time, decode tokens/s and bytes of MoQAECache against DynamicCache and QuantizedCache (quanto,
## int4) at 2,048 and 8,192 tokens: the "Serving" section of BENCH_OUT. quanto builds its C++ extension
## on first use (into checkpoints/torch-extensions), with ninja from the venv.
SERVE_BENCH_ARGS ?=
serve-benchmark: venv
	PATH=$(abspath $(VENV))/bin:$$PATH TORCH_EXTENSIONS_DIR=$(abspath checkpoints/torch-extensions) \
	  $(MOQAE) serve-benchmark --model $(PASSKEY_MODEL) $$([ -f $(SERVE_ROUTER) ] && echo --router $(SERVE_ROUTER)) \
	  --out $(BENCH_OUT) $(SERVE_BENCH_ARGS)

## Throughput, disk streaming and memory against cat and a PyTorch step on a synthetic store:
## docs/PERFORMANCE.md. BENCH_ARGS e.g. "--shape tiny --sequences 64" for a quick run.
BENCH_WORK ?= checkpoints/bench
BENCH_OUT ?= docs/PERFORMANCE.md
BENCH_ARGS ?= --shape llama2-7b --sequences 16 --cold
benchmark: build venv
	$(MOQAE) benchmark --moqae-train $(BIN) --work $(BENCH_WORK) --out $(BENCH_OUT) $(BENCH_ARGS)

## Seconds per window of Taylor and exact sensitivities (resumed, and full forwards) on the same
## SENSITIVITY_WINDOWS windows of the reference model: the "Exact sensitivities" section of BENCH_OUT.
SENSITIVITY_WINDOWS ?= 8
sensitivity-benchmark: venv
	$(MOQAE) sensitivity-benchmark --model models/wt2-byte-llama \
	  --corpus models/wikitext-2/valid.txt --tokenizer bytes --windows $(SENSITIVITY_WINDOWS) --out $(BENCH_OUT)

## Stop soak: trains CONFIG while stopping moqae-train SOAK_KILLS times (SIGKILL, SIGINT, SIGTERM; some during checkpoint
## writes), resuming each time; the result must equal an uninterrupted run (kept in SOAK_RUN_DIR.reference).
SOAK_KILLS ?= 20
SOAK_RUN_DIR ?= checkpoints/soak
soak: build store
	$(MOQAE) soak --moqae-train $(BIN) --config $(CONFIG) --run-dir $(SOAK_RUN_DIR) --set store=$(STORE) --kills $(SOAK_KILLS)

## libFuzzer on each parser of untrusted files (Fuzz/): `make fuzz-checkpoint`, or all of them with
## `make fuzz`, each for FUZZ_SECONDS. New inputs go to checkpoints/fuzz/TARGET, crashes to
## checkpoints/fuzz/TARGET-crash-*; the seeds are in Fuzz/Corpus/TARGET.
FUZZ_TARGETS := safetensors manifest config checkpoint export
FUZZ_SECONDS ?= 600
FUZZ_BIN := Fuzz/.build/release
fuzz-build: setup
	swift build --package-path Fuzz -c release -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -use-ld=lld
fuzz-%: fuzz-build
	mkdir -p checkpoints/fuzz/$*
	SWIFT_BACKTRACE=enable=no $(FUZZ_BIN)/fuzz-$* checkpoints/fuzz/$* Fuzz/Corpus/$* -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	  -artifact_prefix=checkpoints/fuzz/$*- -print_final_stats=1
fuzz: $(addprefix fuzz-,$(FUZZ_TARGETS))

## Every test: Swift Testing (debug build), then pytest for the Python tools.
test: setup venv
	swift test
	cd python && ../$(PY) -m pytest -q tests

clean-run:
	rm -rf $(RUN_DIR)
