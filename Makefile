# The contract of ../shared/DESIGN.md: every target sets up .venv itself when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
SEED ?= 0
# extra expert options, e.g. make expert EXPERT_ARGS="--preset anchor --force"
EXPERT_ARGS ?=

.PHONY: setup data expert transfer test clean-data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

data: setup
	$(PY) -m data_preparation.benchmark --out $(DATA) --seed $(SEED)

# The skewed scenario (issue #12): 6 hospitals under $(DATA)/skewed where federation is hard; the
# expert still comes from the default scenario's $(DATA)/public.
.PHONY: data-skewed
data-skewed: setup
	$(PY) -m data_preparation.benchmark --scenario skewed --out $(DATA)/skewed --seed $(SEED)

expert: data
	$(PY) -m fedxvit.expert --data $(DATA)/public --out models $(EXPERT_ARGS)

transfer: expert
	$(PY) -m fedxvit.transfer --expert models/expert.pt --out models/initial_global.pt

test: setup
	$(PY) -m pytest

clean-data:
	rm -rf $(DATA)

# NVFlare simulator: 3 hospitals as client processes (-t 3); -gpu 0 is ignored on CPU-only machines.
# Outputs: workspace/server/simulate_job/ (global_val.json, cross_site_val/, app_server/*.pt).
.PHONY: simulate
simulate: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/nvflare simulator jobs/fedxvit -w workspace -c site1,site2,site3 -gpu 0 -t 3

# Test report, baselines, cross-site table, TensorBoard curves, Grad-CAM into results/ (result_stat.run_all).
.PHONY: results
results: setup
	$(PY) -m result_stat.run_all --out results

# The whole story, each phase timed (fedxvit.demo runs the targets above and prints the summary).
.PHONY: demo
demo: setup
	$(PY) -m fedxvit.demo

# Benchmarks in one run: federation cost ratios, model throughput, the last demo's timings -> bench/results.json.
.PHONY: bench
bench: setup
	$(PY) bench/run.py

# The same job in NVFlare's POC deployment (real server and client processes), then stopped.
.PHONY: poc
poc: setup
	$(PY) -m fedxvit.poc
