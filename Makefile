# Developer entry points.  `make setup` builds .venv; `make test` runs every check CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The editable install is setuptools' "strict" mode: a tree of symlinks that static tools (mypy,
# import-linter) can read.  It has to be refreshed when modules are added or removed, which the
# directory timestamps below track.
STAMP  := $(VENV)/.installed

.PHONY: setup system-packages test lint unit integration demo bench bench-quick bench-compare bench-compare-quick bench-delta bench-delta-quick bench-delta-e2e bench-http-ranges \
        fuzz-quick sweep sweep-quick clean

# The system packages first (.ci/packages: installed as root with apt-get, or the one apt command
# printed), then the virtual environment.
setup: system-packages $(STAMP)

system-packages:
	bash .ci/system-packages

$(STAMP): setup.cfg pyproject.toml schemas signer plugin
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(BIN)/python -m pip install -q -e '.[test,bench]' --config-settings editable_mode=strict
	# Bytecode as an installed package has it (the shell may set PYTHONDONTWRITEBYTECODE).
	$(BIN)/python -c 'import compileall, otacast; [compileall.compile_dir(d, quiet=1) for d in otacast.__path__]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p otacast.schemas -p otacast.signer -p otacast.plugin
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest tests

integration: setup
	$(BIN)/pytest integration

test: lint unit integration

demo: setup
	$(BIN)/python integration/demo.py

# Benchmarks print numbers and assert nothing; they need root (network namespaces).
bench: setup
	$(BIN)/python integration/bench_sender.py
	$(BIN)/python integration/bench_receiver.py
	$(BIN)/python integration/bench_auth.py
	$(BIN)/python integration/bench_manifest.py

bench-quick: setup
	$(BIN)/python integration/bench_sender.py --quick
	$(BIN)/python integration/bench_receiver.py --quick
	$(BIN)/python integration/bench_auth.py --quick
	$(BIN)/python integration/bench_manifest.py --repeat 2

# otacast side by side with uftp, udpcast and HTTP (nginx) on a namespaced network: tables on
# stdout, JSON and PNG plots in results/.  Needs root and the Debian packages uftp and udpcast.
# The quick one (8 MiB, 5% loss, 1 and 5 receivers) fails only if an image arrives corrupted or a
# tool does not deliver; the full one takes about 8 minutes on 2 cores.
# otacast side by side with uftp, udpcast and HTTP (integration/bench_compare.py; root): 50 MB
# and 500 MB at 0/5/20% loss, a late join, N receivers, several senders, 1 GiB peak RSS; about
# half an hour on 2 cores.  The quick one (8 MiB, 5% loss, one run each, ~2 min) runs in CI.
bench-compare: setup
	$(BIN)/python integration/bench_compare.py

bench-compare-quick: setup
	$(BIN)/python integration/bench_compare.py --quick

# Delta delivery sizes (issue 15): lane + index patch against zstd, xdelta3 and zchunk on ext4
# images built once and cached under /var/tmp/otacast-bench-delta; no root, no network.  About
# 15 minutes at full size (1200 MiB images; xdelta3 takes most of it), 2 in the quick one.
bench-delta: setup
	$(BIN)/python integration/bench_delta.py

bench-delta-quick: setup
	$(BIN)/python integration/bench_delta.py --quick

# Time to image on the delta lane against the full download, end to end over a namespaced LAN
# (root): the cached 1200 MiB images signed once, served at 50 MB/s with the lane at 10%.
bench-delta-e2e: setup
	$(BIN)/python integration/bench_delta.py --e2e small,medium,large

# HTTP repair of partly held chunks (issue 15, Build 4): bytes and requests a device holding v1
# fetches from mirrors only, per gap threshold, for test_reuse's 96 MiB pair and (if cached by
# bench-delta) the 1200 MiB small and medium updates; no root, no network, about a minute.
DELTA_CACHE = /var/tmp/otacast-bench-delta/full
bench-http-ranges: setup
	$(BIN)/python integration/bench_http_ranges.py --test-pair $(foreach u,small medium,$(if $(wildcard $(DELTA_CACHE)/$(u).img),$(DELTA_CACHE)/v1.img $(DELTA_CACHE)/$(u).img))

# Issue 12's simulator sweep: datagrams heard / ideal K/(1-p) and the receiver's high-water
# mark over loss, join time, senders and image sizes up to 4 GiB, for the carousel serve sends
# (the real SenderCore) and a symbol-major reference, on an abstract receiver model.  No root,
# no network; the full one takes about a minute on 2 cores, the quick one under a second.
sweep: setup
	$(BIN)/python integration/sweep.py

sweep-quick: setup
	$(BIN)/python integration/sweep.py --quick

# Coverage-guided fuzzing of what a device parses; a bounded number of runs per target.
FUZZ_RUNS ?= 20000
fuzz-quick: setup
	mkdir -p fuzz/crashes
	# (each target's scratch files, seeds included, in a directory removed after it: libFuzzer
	# exits without running Python's cleanup)
	for target in datagram auth manifest config delta index assembly; do \
	    log=$$(mktemp); scratch=$$(mktemp -d); \
	    TMPDIR=$$scratch $(BIN)/python fuzz/fuzz_device.py $$target -runs=$(FUZZ_RUNS) -seed=1 \
	        -artifact_prefix=fuzz/crashes/ >$$log 2>&1 \
	        || { grep -v '^INFO: Instrumenting' $$log | tail -40; rm -rf $$log $$scratch; exit 1; }; \
	    echo "fuzz $$target: $$(grep -E '^Done [0-9]+ runs' $$log)"; rm -rf $$log $$scratch; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
