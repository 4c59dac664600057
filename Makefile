# Every target sets up .venv itself when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
SEED ?= 0
RESULTS ?= results
# extra expert options, e.g. make expert EXPERT_ARGS="--preset anchor --force"
EXPERT_ARGS ?=
# Empty, so a phase run on its own is not timed. `make demo` sets it for its prerequisites (Make's
# target-specific variables reach them): each phase's command then runs under bench/timed.py, which
# records its wall time and peak memory in $(RESULTS)/timings.json for result_stat.summary.
TIMED =

# The phases build on each other in the order they are listed; never reorder them with -j.
.NOTPARALLEL:
.PHONY: setup data expert transfer simulate baselines results demo bench poc jobs test lint clean-data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

data: setup
	$(TIMED) $(PY) -m data_preparation.benchmark --out $(DATA) --seed $(SEED)

# The skewed scenario (issue #12): 6 hospitals under $(DATA)/skewed where federation is hard; the
# expert still comes from the default scenario's $(DATA)/public.
.PHONY: data-skewed data-skewed-calibration calibrate-skewed
data-skewed: setup
	$(PY) -m data_preparation.benchmark --scenario skewed --out $(DATA)/skewed --seed $(SEED)

# Calibrating the skewed scenario (is federation hard enough?) on data of its own seed, scored on its validation
# cohorts only: the comparisons' data ($(DATA)/skewed, --seed $(SEED)) is never looked at while setting the scenario.
CALIBRATION_SEED ?= 100
data-skewed-calibration: setup
	$(PY) -m data_preparation.benchmark --scenario skewed --out $(DATA)/skewed-calibration --seed $(CALIBRATION_SEED)

calibrate-skewed: data-skewed-calibration
	$(PY) -m data_preparation.federated_gap --data $(DATA)/skewed-calibration $(if $(COMPARE_BUDGET),--budget $(COMPARE_BUDGET))

# Know the data before training (NVFlare's federated statistics, jobs/fedxvit_stats): per site and for the
# federation, image and label counts, gray values, image sizes and lesion areas -> $(RESULTS)/stats/.
# `make stats STATS_DATA=data/skewed` for the skewed scenario; any folder of imported site folders works.
STATS_DATA ?= $(DATA)
.PHONY: stats
stats: setup
	$(PY) -m result_stat.data_stats --data $(STATS_DATA) --out $(RESULTS)/stats

# The docs' pictures (docs/img): scanners and masks per scenario, label mix per hospital, an explanation panel;
# from the data of `make data data-skewed data-longtail` (a missing scenario is left out) and models/initial_global.pt.
.PHONY: doc-figures
doc-figures: setup
	$(PY) -m result_stat.doc_figures --data $(DATA) --out docs/img

expert: data
	$(TIMED) $(PY) -m tooling.expert --data $(DATA)/public --out models $(EXPERT_ARGS)

transfer: expert
	$(TIMED) $(PY) -m tooling.transfer --expert models/expert.pt --out models/initial_global.pt

# Which Grad-CAM-style map should the report show? Every candidate through the toy controls, then scored on the
# validation masks (test for the record) of the run's final model -> $(RESULTS)/gradcam_choice.md.
.PHONY: gradcam-choice
gradcam-choice: setup
	$(PY) -m result_stat.gradcam --choose --out $(RESULTS)

# The test report where the data lives (jobs/fedxvit_evaluate): each site scores the run's final and best models
# on its own test split and sends counts and histograms only -> $(RESULTS)/evaluation/.
.PHONY: evaluate
evaluate: setup
	$(PY) -m result_stat.federated_evaluation --data $(DATA) --out $(RESULTS)/evaluation

# NVFlare simulator: 3 hospitals as client processes (-t 3); -gpu 0 is ignored on CPU-only machines. First the
# job's site options are checked (tooling.jobconfig): a bad job variable is one line, not a failed run.
# Outputs: workspace/server/simulate_job/ (global_val.json, cross_site_val/, app_server/*.pt).
simulate: setup
	$(PY) -m tooling.jobconfig jobs/fedxvit
	$(PY) -m fedxvit.site_policy workspace/local >/dev/null  # jobs carry no code: these participants allow fedxvit's classes
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(TIMED) $(VENV)/bin/nvflare simulator jobs/fedxvit -w workspace -c site1,site2,site3 -gpu 0 -t 3

# fedxvit as a Flower app (custom/fedxvit/flower_app), two ways, the same app, data and initial model:
# - `make flower`: Flower's own simulation engine (tooling.flower; Ray) -> workspace/flower/run/ (app_server/*.pt,
#   global_val.json, tb_events/), e.g. FLOWER_ARGS="--run-config num-server-rounds=3";
# - `make simulate-flower`: inside NVFlare, jobs/fedxvit_flower in the simulator, the app pre-deployed in the
#   server's local/custom/ -> workspace/flower-nvflare/server/simulate_job/;
# - `make compare-flower`: both and jobs/fedxvit, 3 seeds, paired verdicts -> $(RESULTS)/flower_comparison.md.
FLOWER_ARGS ?=
.PHONY: flower simulate-flower compare-flower
flower: setup
	$(PY) -m tooling.flower --data $(DATA) $(FLOWER_ARGS)

simulate-flower: setup
	$(PY) -m fedxvit.site_policy workspace/flower-nvflare/local >/dev/null
	$(PY) -m fedxvit.flower_server install workspace/flower-nvflare/local >/dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/nvflare simulator jobs/fedxvit_flower -w workspace/flower-nvflare -c site1,site2,site3 -gpu 0 -t 3

compare-flower: setup
	$(PY) -m result_stat.flower_comparison --data $(DATA) --out $(RESULTS)

# Centralized and local-only models with the run's own settings -> models/baselines/ (tooling.baselines).
baselines: setup
	$(TIMED) $(PY) -m tooling.baselines

# Test report, baselines' scores, cross-site table, TensorBoard curves, Grad-CAM -> results/ (result_stat.run_all).
results: baselines
	$(TIMED) $(PY) -m result_stat.run_all --out $(RESULTS)

# The whole story, each phase timed; ends with the summary (summary.json rewritten with every phase's timing).
demo: TIMED = $(PY) bench/timed.py --phase $@ --log $(RESULTS)/timings.json --
demo: data expert transfer simulate baselines results
	$(PY) -m result_stat.summary --results $(RESULTS) --print

# Benchmarks in one run: federation cost ratios, model throughput, the last demo's timings -> bench/results.json.
bench: setup
	PYTHONPATH=$(CURDIR) $(PY) bench/run.py

# What HE costs: plain vs HE FedAvg in POC per freeze policy (time and bytes per round, test accuracy) -> bench/he.json.
.PHONY: bench-he
bench-he: setup
	PYTHONPATH=$(CURDIR) $(PY) bench/he_cost.py --data $(DATA)

# The same job in NVFlare's POC deployment (real server and client processes), then stopped.
# Fault drills: make poc POC_ARGS="--kill-server-after-round 1" (or "--min-clients 2 --kill-site site3", or both).
POC_ARGS ?=
poc: setup
	$(PY) -m tooling.poc $(POC_ARGS)

# FedAvg with homomorphic encryption (jobs/fedxvit_he) in a POC system provisioned for HE: the server
# aggregates ciphertext only. Decrypt the final model at a site: python -m fedxvit.he decrypt (docs/privacy.md).
.PHONY: poc-he
poc-he: setup
	$(PY) -m tooling.poc --job jobs/fedxvit_he --out workspace/poc-he $(POC_ARGS)

# The production path rehearsed on this machine: deploy/project.yml provisioned (server localhost, the data's
# hospitals), every kit preflight-checked and started with its own start.sh, the job through the Flare API, shut down.
PROVISIONED_ARGS ?=
.PHONY: provisioned
provisioned: setup
	$(PY) -m tooling.provisioned --workspace $(CURDIR)/workspace/provisioned-kits --sites site1 site2 site3 \
		--out workspace/provisioned $(PROVISIONED_ARGS)

# The algorithm and privacy jobs (jobs/fedxvit_fedprox, _fedopt, _scaffold, _cyclic, _ditto, _percentile_privacy,
# _svt_privacy, _exclude_vars, _dp_sgd, _he), generated from jobs/fedxvit by tooling.jobs.
jobs: setup
	$(PY) -m tooling.jobs

# Three worker processes on two cores: a federation spends much of its time in one process at a time (the server's
# start-up, the sites' imports, NVFlare's shut-down waits), which leaves a core idle under two workers (471 s vs
# 389 s for the same suite, docs/measurements.md#make-test). A test file is one xdist group (its fixtures are built
# once), and the tests that share the plain FedAvg simulator run and the one POC system form one group of their own
# (tests/conftest.py), so no two POC systems ever run at once. One process for debugging: $(PY) -m pytest -n 0.
test: setup
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder --durations=25

# ruff (settings in pyproject.toml): lint and format check; `ruff format . && ruff check --fix .` repairs most.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-data:
	rm -rf $(DATA)

# Choosing an algorithm: every method tuned on validation, then it, centralized and local-only on the same data,
# initial model and budget, 3 seeds, each difference to FedAvg with a paired bootstrap interval and a verdict ->
# results/compare.json, compare.md, compare_forest.png, compare_curves.png (result_stat.compare; finished runs in
# workspace/compare are reused, so an interrupted run resumes). Needs the scenario's sites and
# models/initial_global.pt (make data-skewed transfer). compare-quick: one seed, 2 rounds, no tuning.
# Options: COMPARE_ARGS="--methods fedavg,fedprox".
COMPARE_DATA ?= $(DATA)/skewed
COMPARE_ARGS ?=
.PHONY: compare compare-quick
# the budget measured on the calibration seed's data (make budget-skewed), when there is one
COMPARE_BUDGET ?= $(wildcard $(DATA)/skewed-calibration/budget.json)
compare: setup
	$(PY) -m result_stat.compare --scenario-data $(COMPARE_DATA) --out results $(if $(COMPARE_BUDGET),--budget $(COMPARE_BUDGET)) $(COMPARE_ARGS)

# How long comparisons train: FedAvg on the calibration seed's data with 2, 4 and 8 local epochs for 24 passes
# each; rounds x epochs where its (smoothed) validation curve flattens -> $(DATA)/skewed-calibration/budget.json.
.PHONY: budget-skewed
budget-skewed: data-skewed-calibration
	$(PY) -m result_stat.budget --scenario-data $(DATA)/skewed-calibration --passes 24 --local-epochs 2,4,8 \
		--workspace workspace/budget-skewed

compare-quick: setup
	$(PY) -m result_stat.compare --scenario-data $(COMPARE_DATA) --out results --quick $(COMPARE_ARGS)

# Long-tailed data (docs/imbalance.md): the 4-class scenario of 5 hospitals (notumor : pituitary = 22 : 1),
# homo or Dirichlet partition; FedMAS's self-supervised prior, pretrained on the public images and cached in
# models/; FedAvg with cross-entropy, FedAvg with Balanced Softmax and FedMAS, from the Phase-1 expert
# (models/expert.pt), against centralized and local-only, 3 seeds -> results/longtail/.
# Calibrating or tuning: COMPARE_ARGS="--split validation" scores the validation splits instead.
LONGTAIL_PARTITION ?= homo
LONGTAIL_ALPHA ?= 0.5
LONGTAIL_DATA = $(DATA)/longtail/$(if $(filter dirichlet,$(LONGTAIL_PARTITION)),dirichlet-$(LONGTAIL_ALPHA),homo)
.PHONY: data-longtail data-longtail-calibration budget-longtail ssl-prior compare-longtail
data-longtail: setup
	$(PY) -m data_preparation.benchmark --scenario longtail --partition $(LONGTAIL_PARTITION) \
		$(if $(filter dirichlet,$(LONGTAIL_PARTITION)),--alpha $(LONGTAIL_ALPHA)) --out $(LONGTAIL_DATA) --seed $(SEED)

# How long the long-tailed comparison trains: as budget-skewed, on the scenario drawn with the calibration seed
# (validation cohorts only), from the expert, 24 passes (at 12 every curve still rose; docs/measurements.md)
# -> $(LONGTAIL_DATA)-calibration/budget.json, which compare-longtail reads.
LONGTAIL_CALIBRATION = $(LONGTAIL_DATA)-calibration
LONGTAIL_BUDGET ?= $(wildcard $(LONGTAIL_CALIBRATION)/budget.json)
data-longtail-calibration: setup
	$(PY) -m data_preparation.benchmark --scenario longtail --partition $(LONGTAIL_PARTITION) \
		$(if $(filter dirichlet,$(LONGTAIL_PARTITION)),--alpha $(LONGTAIL_ALPHA)) --out $(LONGTAIL_CALIBRATION) \
		--seed $(CALIBRATION_SEED)

budget-longtail: expert data-longtail-calibration
	$(PY) -m result_stat.budget --scenario-data $(LONGTAIL_CALIBRATION) --initial models/expert.pt \
		--passes 24 --local-epochs 2,4,8 --workspace workspace/budget-longtail

ssl-prior: data
	$(PY) -m tooling.pretrain_prior --data $(DATA)/public --out models/ssl_prior.pt

compare-longtail: ssl-prior expert data-longtail
	$(PY) -m result_stat.compare --scenario-data $(LONGTAIL_DATA) --initial models/expert.pt \
		--methods fedavg,fedavg-bsm,fedmas --workspace workspace/compare-longtail \
		$(if $(LONGTAIL_BUDGET),--budget $(LONGTAIL_BUDGET)) \
		--out results/longtail$(if $(filter --split validation,$(COMPARE_ARGS)),-validation) $(COMPARE_ARGS)

# What update privacy costs (docs/privacy.md): FedAvg against FedAvg behind each of NVFlare's privacy
# filters and with DP-SGD, on `make compare`'s data, budget and seeds, every method and baseline training all but
# BatchNorm (DP-SGD cannot train BatchNorm; noised BatchNorm statistics break a model) -> results/privacy/.
# DP-SGD at ε 3 only by default: a DP-SGD run costs 2.5 FedAvg runs, and one ε keeps the comparison within issue
# #26's 2 hours; PRIVACY_METHODS="fedavg,dp-sgd-eps1,dp-sgd-eps3,dp-sgd-eps8" for the curve over ε.
PRIVACY_METHODS ?= fedavg,percentile,svt,exclude,dp-sgd-eps3
.PHONY: compare-privacy
compare-privacy: setup
	$(PY) -m result_stat.compare --scenario-data $(COMPARE_DATA) --out results/privacy $(if $(COMPARE_BUDGET),--budget $(COMPARE_BUDGET)) \
		--freeze-policy full-but-batchnorm \
		--methods $(PRIVACY_METHODS) $(COMPARE_ARGS)
