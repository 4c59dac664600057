"""Every federated method fedxvit ships, listed once: the job folders (each with its sites' strategy) and the methods
`make compare*` runs on them. The job generator (tooling.jobs), the sites' strategies (fedxvit.algorithms) and the
comparisons' method lists (result_stat.comparison.plan) are derived from here, so a new method is one entry here,
one change to jobs/fedxvit in tooling.jobs, and a strategy class when its sites train differently."""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_JOB = "fedxvit"  # FedAvg, written by hand; every other job is generated from it
FLOWER_JOB = "fedxvit_flower"  # the Flower app (fedxvit/flower_app) inside NVFlare; written by hand
HE_JOB = "fedxvit_he"  # needs keys only a provisioned system has: never simulated, never compared


@dataclass(frozen=True)
class Job:
    site_strategy: str  # what the sites run: the executor's `algorithm` option (fedxvit.algorithms)
    family: str  # "algorithm" (docs/federated-jobs.md) or "privacy" (docs/privacy.md)
    description: str  # the generated folder's README


JOBS = {
    BASE_JOB: Job(
        "fedavg",
        "algorithm",
        "FedAvg: NVFlare's ScatterAndGather with fedxvit's screened, step-weighted mean of the sites' weight "
        "differences.",
    ),
    "fedxvit_fedprox": Job(
        "fedprox",
        "algorithm",
        "FedProx: every site adds NVFlare's PTFedProxLoss (job variable `mu`, client "
        "config) over its trainable tensors; the server is the FedAvg job's.",
    ),
    "fedxvit_fedopt": Job(
        "fedavg",
        "algorithm",
        "FedOpt: the server applies the averaged update with SGD and momentum "
        "(NVFlare's PTFedOptModelShareableGenerator; job variables `server_lr`, "
        "`server_momentum`, server config); the sites run FedAvg.",
    ),
    "fedxvit_scaffold": Job(
        "scaffold",
        "algorithm",
        "SCAFFOLD: NVFlare's ScatterAndGatherScaffold and PTScaffoldHelper; each "
        "site's control-variate change travels with its update and is checked by the "
        "same update filter and norm screening.",
    ),
    "fedxvit_ditto": Job(
        "ditto",
        "algorithm",
        "Ditto: FedAvg for the global model, plus a personalized model per site that never leaves it, "
        "trained after each round with NVFlare's PTDittoHelper towards the global model (job variables "
        "`ditto_lambda`, `personal_epochs`, client config); each site keeps its best one (by validation "
        "balanced accuracy) in best_personalized_model.pt.",
    ),
    "fedxvit_fedsm": Job(
        "fedsm",
        "algorithm",
        "FedSM: FedAvg for the global model, plus a personalized model per site (the server sends each site "
        "its SoftPull aggregate of the sites' personalized models; job variable `softpull_lambda`, server "
        "config) and a selector that learns which site an image comes from (weights and Adam moments "
        "averaged); the server keeps them in app_server/fedsm_models.pt for routing (fedxvit.fedsm).",
    ),
    "fedxvit_fedmas": Job(
        "fedavg",
        "algorithm",
        "FedMAS for long-tailed data (4 classes, data/longtail): every site trains with Balanced Softmax "
        "(`loss`, client config) and measures its model against the frozen self-supervised prior "
        "`mas_prior` (make ssl-prior); the server weighs the updates by those MAS factors instead of by "
        "steps (fedxvit.imbalance). Starts from the 4-class expert (models/expert.pt).",
    ),
    "fedxvit_cyclic": Job(
        "fedavg",
        "algorithm",
        "Cyclic weight transfer: NVFlare's CyclicController hands the model from site to "
        "site (job variables `order`, `task_assignment_timeout`, server config); a bad "
        "site's turn changes nothing instead of stopping the relay.",
    ),
    "fedxvit_percentile_privacy": Job(
        "fedavg",
        "privacy",
        "FedAvg whose sites send only the largest changes of each update: NVFlare's PercentilePrivacy "
        "filter (job variables `percentile`, `gamma`, client config).",
    ),
    "fedxvit_svt_privacy": Job(
        "fedavg",
        "privacy",
        "FedAvg whose sites send a noisy, sparse update chosen by the sparse vector technique: NVFlare's "
        "SVTPrivacy filter (job variables `fraction`, `epsilon`, `noise_var`, `gamma`, `tau`, client config).",
    ),
    "fedxvit_dp_sgd": Job(
        "fedavg",
        "privacy",
        "FedAvg whose sites train with record-level differential privacy (DP-SGD with Opacus: "
        "per-image clipping and noise, one accountant per site across rounds; job variables "
        "`dp_epsilon`, `dp_delta`, `dp_max_grad_norm`, client config).",
    ),
    HE_JOB: Job(
        "fedavg",
        "privacy",
        "FedAvg with homomorphic encryption (NVFlare's TenSEAL CKKS components): the server aggregates "
        "encrypted updates and never holds a plaintext update or model. Needs a deployment provisioned for HE "
        "(`make poc-he`, `nvflare poc prepare -he`, or deploy/project.yml with its HEBuilder); it does not run in "
        "the simulator, which has no keys.",
    ),
    "fedxvit_exclude_vars": Job(
        "fedavg",
        "privacy",
        "FedAvg whose sites never send the tensors matching `exclude_vars` (a regular expression; "
        "default the classifier head): NVFlare's ExcludeVars filter.",
    ),
}


@dataclass(frozen=True)
class Method:
    job: str  # a key of JOBS
    comparison: str  # which report compares it: "federated" (make compare), "privacy", "longtail"
    client_variables: dict = field(default_factory=dict)  # job variables the method sets on its copy of the job


DP_EPSILONS = (1, 3, 8)  # DP-SGD's budgets in make compare-privacy: one method per budget, one job
METHODS = {
    "fedavg": Method(BASE_JOB, "federated"),
    "fedprox": Method("fedxvit_fedprox", "federated"),
    "fedopt": Method("fedxvit_fedopt", "federated"),
    "scaffold": Method("fedxvit_scaffold", "federated"),
    "cyclic": Method("fedxvit_cyclic", "federated"),
    "ditto": Method("fedxvit_ditto", "federated"),  # also scored as "ditto (personalized)": each site's own model
    "fedsm": Method("fedxvit_fedsm", "federated"),  # also "fedsm (personalized)": the selector-routed super-model
    "percentile": Method("fedxvit_percentile_privacy", "privacy"),
    "svt": Method("fedxvit_svt_privacy", "privacy"),
    "exclude": Method("fedxvit_exclude_vars", "privacy"),
    **{f"dp-sgd-eps{eps}": Method("fedxvit_dp_sgd", "privacy", {"dp_epsilon": float(eps)}) for eps in DP_EPSILONS},
    "fedavg-bsm": Method(BASE_JOB, "longtail", {"loss": "bsm"}),  # FedAvg, the sites training with Balanced Softmax
    "fedmas": Method("fedxvit_fedmas", "longtail"),  # Balanced Softmax + MAS aggregation weights
}
SITE_STRATEGIES = tuple(dict.fromkeys(job.site_strategy for job in JOBS.values()))


def generated_jobs(family: str) -> list[str]:
    """The job folders tooling.jobs writes from jobs/fedxvit, of one family."""
    return [name for name, job in JOBS.items() if name != BASE_JOB and job.family == family]


def compared(comparison: str) -> dict:
    """{method: job folder under the checkout} of one comparison, in the registry's order."""
    return {name: f"jobs/{m.job}" for name, m in METHODS.items() if m.comparison == comparison}


def jobs_running(strategy: str) -> list[str]:
    """The job folders whose sites run `strategy`."""
    return [name for name, job in JOBS.items() if job.site_strategy == strategy]
