"""One source for every algorithm's job: jobs/fedxvit plus a small per-algorithm change.

`python -m tooling.jobs` (`make jobs`) writes jobs/fedxvit_fedprox, _fedopt, _scaffold, _ditto,
_fedsm, _fedmas and _cyclic, and the privacy variants _percentile_privacy, _svt_privacy, _exclude_vars, _dp_sgd
and _he, from jobs/fedxvit, so a common setting (a default, a component, a timeout) is changed
once, in jobs/fedxvit, and the generated folders follow. They are committed, so each is a plain
NVFlare job (`nvflare simulator jobs/<job> ...`); `--check` (and a test) fails when a committed
folder differs from what this writes. jobs/fedxvit itself, FedAvg, is never rewritten.

Which jobs exist, their sites' strategy and their description are fedxvit.methods' (the one registry); each change
below is the whole difference from FedAvg, built from NVFlare's stock components:
FedProx, SCAFFOLD and Ditto switch the sites' strategy (fedxvit.algorithms); FedOpt swaps the
shareable generator for PTFedOptModelShareableGenerator; SCAFFOLD runs ScatterAndGatherScaffold;
FedSM keeps ScatterAndGather with fedxvit.server_algorithms' FedSM generator, assembler and task-data filter; FedMAS
weighs the mean by the sites' MAS factors (fedxvit.aggregation) and trains with Balanced Softmax;
cyclic replaces ScatterAndGather with CyclicController. The privacy variants are FedAvg with one
of NVFlare's privacy filters on every site's `train` result, with DP-SGD, or with NVFlare's
homomorphic-encryption components; their sites send only what aggregation and evaluation need beside
the weights, and the filter and HE jobs keep each site's local model at the site (docs/privacy.md).
Job folders carry no code (no app/custom/): every participant allows fedxvit's classes itself
(fedxvit.site_policy), and nothing here writes one.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.methods import BASE_JOB, HE_JOB, JOBS, generated_jobs
from fedxvit.paths import project_root
from tooling.jobconfig import CLIENT_FILE, META, SERVER_FILE, config_text, read_job_config

NVFLARE_PT = "nvflare.app_opt.pt"
NVFLARE_WORKFLOWS = "nvflare.app_common.workflows"
NVFLARE_FILTERS = "nvflare.app_common.filters"


def set_variables(config: dict, **variables) -> None:
    """Add or change job variables, kept at the top of the file with the others (before the lists)."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, (list, dict))}
    rest = {k: v for k, v in config.items() if k not in scalars}
    config.clear()
    config.update({**scalars, **variables, **rest})


def drop_variables(config: dict, *names: str) -> None:
    for name in names:
        del config[name]


def find(config: dict, section: str, entry_id: str) -> dict:
    """The entry `entry_id` of a config's `components` or `workflows` list."""
    for entry in config[section]:
        if entry.get("id") == entry_id:
            return entry
    raise FedXViTError(f"jobs/{BASE_JOB}: no {section} entry '{entry_id}' (the per-algorithm changes need it)")


def drop(config: dict, section: str, *entry_ids: str) -> None:
    for entry_id in entry_ids:
        config[section].remove(find(config, section, entry_id))


def find_filter(config: dict, filter_id: str) -> dict:
    """The filter `filter_id` in a config's task_result_filters."""
    for chain in config["task_result_filters"]:
        for entry in chain["filters"]:
            if entry.get("id") == filter_id:
                return entry
    raise FedXViTError(f"jobs/{BASE_JOB}: no task result filter '{filter_id}' (the per-algorithm changes need it)")


def tracked_params(server: dict) -> dict:
    """The server run's parameters in MLflow (the mlflow_receiver's `params`)."""
    return find(server, "components", "mlflow_receiver")["args"]["params"]


def strategy_options(client: dict, **options) -> None:
    """Options of the sites' strategy as client job variables (the strategy itself is the registry's)."""
    set_variables(client, **options)
    client["executors"][0]["executor"]["args"].update({name: "{" + name + "}" for name in options})


def fedprox(server: dict, client: dict) -> None:
    strategy_options(client, mu=0.01)
    tracked_params(server)["algorithm"] = "fedprox"


def fedopt(server: dict, client: dict) -> None:
    set_variables(server, server_lr=1.0, server_momentum=0.6)
    generator = find(server, "components", "shareable_generator")
    generator["path"] = f"{NVFLARE_PT}.fedopt.PTFedOptModelShareableGenerator"
    generator["args"] = {
        "source_model": "server_model",
        "optimizer_args": {  # a dict the generator builds at START_RUN
            "path": "torch.optim.SGD",
            "args": {"lr": "{server_lr}", "momentum": "{server_momentum}"},
            "config_type": "dict",
        },
    }
    at = server["components"].index(generator)
    server["components"][at:at] = [
        {
            "id": "server_model",
            "path": "fedxvit.model.HybridViT",
            "args": {"preset": "{preset}", "num_classes": "{num_classes}"},
        },
        {
            "id": "server_model_sync",
            "path": "fedxvit.server_algorithms.ServerModelSync",
            "args": {"model_id": "server_model"},
        },
    ]
    tracked_params(server).update(algorithm="fedopt", server_lr="{server_lr}", server_momentum="{server_momentum}")


def scaffold(server: dict, client: dict) -> None:
    workflow = find(server, "workflows", "scatter_and_gather")
    workflow["path"] = f"{NVFLARE_WORKFLOWS}.scatter_and_gather_scaffold.ScatterAndGatherScaffold"
    del workflow["args"]["memory_gc_rounds"]  # not an argument of NVFlare's SCAFFOLD workflow: it cleans every round
    assembler = find(server, "components", "assembler")
    assembler["path"] = "fedxvit.server_algorithms.ScaffoldScreenedAssembler"
    assembler["args"]["data_kind"] = "COLLECTION"  # the weights and the control variates in one DXO
    tracked_params(server)["algorithm"] = "scaffold"


def fedsm(server: dict, client: dict) -> None:
    strategy_options(client, personal_epochs=1)
    set_variables(server, softpull_lambda=0.3)
    generator = find(server, "components", "shareable_generator")
    generator["path"] = "fedxvit.server_algorithms.FedSMShareableGenerator"
    generator["args"]["softpull_lambda"] = "{softpull_lambda}"
    assembler = find(server, "components", "assembler")
    assembler["path"] = "fedxvit.server_algorithms.FedSMAssembler"
    assembler["args"]["data_kind"] = "COLLECTION"  # the weights and the FedSM models in one DXO
    server["task_data_filters"] = [
        {
            "tasks": ["train"],
            "filters": [{"id": "fedsm_site_models", "path": "fedxvit.server_algorithms.FedSMSiteModels", "args": {}}],
        }
    ]
    tracked_params(server).update(algorithm="fedsm", softpull_lambda="{softpull_lambda}")


def ditto(server: dict, client: dict) -> None:
    strategy_options(client, ditto_lambda=0.1, personal_epochs=1)
    tracked_params(server)["algorithm"] = "ditto"


def fedmas(server: dict, client: dict) -> None:
    # the long-tailed 4-class scenario's job: Balanced Softmax at the sites, MAS weights on the server
    set_variables(server, num_classes=4)
    set_variables(client, num_classes=4, loss="bsm", mas_prior="models/ssl_prior.pt")
    client["executors"][0]["executor"]["args"]["mas_prior"] = "{mas_prior}"
    find(server, "components", "assembler")["args"]["weighting"] = "mas"
    tracked_params(server).update(algorithm="fedmas", num_classes="{num_classes}")


def cyclic(server: dict, client: dict) -> None:
    # no rounds of collected updates: no aggregator, screening, round table or best-model selection
    drop_variables(
        server,
        "min_clients",
        "aggregation",
        "norm_k",
        "trim_fraction",
        "max_weight_ratio",
        "key_metric",
        "wait_time_after_min_received",
        "train_timeout",
    )
    set_variables(server, order="FIXED", task_assignment_timeout=60)
    drop(server, "components", "assembler", "aggregator", "model_selector", "global_validation")
    workflow = find(server, "workflows", "scatter_and_gather")
    workflow.update(
        id="cyclic",
        path=f"{NVFLARE_WORKFLOWS}.cyclic_ctl.CyclicController",
        args={
            "num_rounds": "{num_rounds}",
            "task_assignment_timeout": "{task_assignment_timeout}",
            "persistor_id": "persistor",
            "shareable_generator_id": "shareable_generator",
            "task_name": "train",
            "order": "{order}",
            "memory_gc_rounds": workflow["args"]["memory_gc_rounds"],
        },
    )
    update_filter = find_filter(server, "reject_bad_updates")
    update_filter["args"]["on_bad_result"] = "empty_update"  # CyclicController stops on any error result
    params = tracked_params(server)
    del params["min_clients"]
    params["algorithm"] = "cyclic"


ALGORITHM_CHANGES = {  # job folder -> its change to jobs/fedxvit; which jobs exist is fedxvit.methods.JOBS
    "fedxvit_fedprox": fedprox,
    "fedxvit_fedopt": fedopt,
    "fedxvit_scaffold": scaffold,
    "fedxvit_ditto": ditto,
    "fedxvit_fedsm": fedsm,
    "fedxvit_fedmas": fedmas,
    "fedxvit_cyclic": cyclic,
}
ALGORITHM_JOBS = {name: (ALGORITHM_CHANGES[name], JOBS[name].description) for name in generated_jobs("algorithm")}


# ---- update privacy: one of NVFlare's stock privacy filters on every site's `train` result


def privacy_results(client: dict, train_filters: list, local_model_leaves: bool) -> None:
    """The sites' result chains of a privacy job: `train_filters` on every update, then the base job's
    MetadataPolicy with the privacy default (only what aggregation and evaluation need: may_leave
    'aggregation'; a site's own answer replaces it); the local model either leaves under the same policy
    or stays at the site (KeepLocalModel answers the request with an error reply)."""
    set_variables(client, may_leave="aggregation")
    policy = {key: value for key, value in find_filter(client, "metadata_policy").items() if key != "id"}
    keep = {"path": "fedxvit.site_policy.KeepLocalModel", "args": {}}
    client["task_result_filters"] = [
        {"tasks": ["train"], "filters": [*train_filters, policy]},
        {"tasks": ["validate"], "filters": [policy]},
        {"tasks": ["submit_model"], "filters": [policy if local_model_leaves else keep]},
    ]


def no_local_models(server: dict) -> None:
    """Cross-site evaluation scores the global model only: the server asks for no site's local model (and the
    sites' KeepLocalModel answers a server that asks anyway with an error reply, not the model)."""
    find(server, "workflows", "cross_site_model_eval")["args"]["submit_model_task_name"] = ""


def result_filter(server: dict, client: dict, name: str, path: str, **variables) -> None:
    """The sites pass every update through NVFlare filter `path` before it leaves; its options become
    client job variables of the same names. The server's run records which filter (MLflow `privacy`).
    The filter's promise is about everything a site sends, and a site's best local model would leave whole
    and in clear in cross-site evaluation (the filters treat their input as an update: they zero and clip
    values, so a filtered model is not a model), so these jobs collect no local model (no_local_models)."""
    set_variables(client, **variables)
    train_filter = {"path": path, "args": {key: "{" + key + "}" for key in variables}}
    privacy_results(client, [train_filter], local_model_leaves=False)
    tracked_params(server)["privacy"] = name
    no_local_models(server)


def percentile_privacy(server: dict, client: dict) -> None:
    # share only the changes above the 90th percentile of |change| (the largest 10%), each clipped to
    # +-gamma per local step (Shokri & Shmatikov, CCS 2015)
    result_filter(
        server,
        client,
        "percentile",
        f"{NVFLARE_FILTERS}.percentile_privacy.PercentilePrivacy",
        percentile=90,
        gamma=0.01,
    )


def svt_privacy(server: dict, client: dict) -> None:
    # NVFlare's defaults: upload a noisy 10% of the changes chosen by the sparse vector technique
    result_filter(
        server,
        client,
        "svt",
        f"{NVFLARE_FILTERS}.svt_privacy.SVTPrivacy",
        fraction=0.1,
        epsilon=0.1,
        noise_var=0.1,
        gamma=1e-5,
        tau=1e-6,
    )


def exclude_vars(server: dict, client: dict) -> None:
    # the classifier head never leaves the site: the global model's head stays the transplanted one
    result_filter(server, client, "exclude", f"{NVFLARE_FILTERS}.exclude_vars.ExcludeVars", exclude_vars="^head\\.")


def dp_sgd(server: dict, client: dict) -> None:
    # the local model a site submits for cross-site evaluation was trained with DP-SGD like every update it
    # sent (its best round's model, picked on validation images outside the training data): it is covered
    # by the same (epsilon, delta), so this job keeps cross-site evaluation of the local models
    strategy_options(client, dp_epsilon=8.0, dp_delta=1e-5, dp_max_grad_norm=1.0)
    privacy_results(client, [], local_model_leaves=True)
    tracked_params(server)["privacy"] = "dp-sgd"


NVFLARE_HE = "nvflare.app_opt.he"


def homomorphic_encryption(server: dict, client: dict) -> None:
    # NVFlare's TenSEAL (CKKS) components: the sites encrypt every update (weighted by their local steps)
    # and decrypt the global model; the server adds ciphertexts and keeps the global model encrypted.
    # It cannot look into an update, so the plaintext screening (RejectBadUpdates, ScreenedAssembler)
    # goes, and the sites' local models are not collected for cross-site evaluation (they would reach
    # the server in clear): only the global model is scored, at each site, after decryption there.
    drop_variables(server, "aggregation", "norm_k", "trim_fraction", "max_weight_ratio")
    server["task_result_filters"][0]["filters"].remove(find_filter(server, "reject_bad_updates"))
    server["components"].insert(
        0, {"id": "serialize_filter", "path": f"{NVFLARE_HE}.model_serialize_filter.HEModelSerializeFilter", "args": {}}
    )
    find(server, "components", "persistor")["args"]["filter_id"] = "serialize_filter"
    generator = find(server, "components", "shareable_generator")
    generator["path"] = f"{NVFLARE_HE}.model_shareable_generator.HEModelShareableGenerator"
    drop(server, "components", "assembler")
    aggregator = find(server, "components", "aggregator")
    aggregator["path"] = "fedxvit.he.HEPartialUpdateAggregator"  # NVFlare's, for updates of the trainable tensors
    aggregator["args"] = {}
    find(server, "components", "model_locator")["path"] = "fedxvit.he.SerializedModelLocator"
    cross_site = find(server, "workflows", "cross_site_model_eval")
    cross_site["path"] = f"{NVFLARE_HE}.cross_site_model_eval.HECrossSiteModelEval"
    no_local_models(server)  # local models would reach the server in clear
    server["task_data_filters"] = []  # the global model goes whole: its trainable tensors as ciphertext
    server["registered_model_name"] = ""  # the server's model is ciphertext: nothing readable to register
    tracked_params(server)["privacy"] = "he"
    client["task_data_filters"] = [
        {
            "tasks": ["train", "validate"],
            "filters": [{"path": f"{NVFLARE_HE}.model_decryptor.HEModelDecryptor", "args": {}}],
        }
    ]
    encryptor = {"path": f"{NVFLARE_HE}.model_encryptor.HEModelEncryptor", "args": {"weigh_by_local_iter": True}}
    privacy_results(client, [encryptor], local_model_leaves=False)


PRIVACY_CHANGES = {  # job folder -> its change to jobs/fedxvit; which jobs exist is fedxvit.methods.JOBS
    "fedxvit_percentile_privacy": percentile_privacy,
    "fedxvit_svt_privacy": svt_privacy,
    "fedxvit_dp_sgd": dp_sgd,
    HE_JOB: homomorphic_encryption,
    "fedxvit_exclude_vars": exclude_vars,
}
PRIVACY_JOBS = {name: (PRIVACY_CHANGES[name], JOBS[name].description) for name in generated_jobs("privacy")}
GENERATED_JOBS = {**ALGORITHM_JOBS, **PRIVACY_JOBS}


def readme(name: str, description: str) -> str:
    command = (
        f"python -m tooling.poc --job jobs/{name}   # make poc-he: a POC system provisioned for HE"
        if name == HE_JOB
        else "python -m fedxvit.site_policy workspace/local   # once: allow fedxvit's classes (jobs carry no code)\n"
        f"nvflare simulator jobs/{name} -w workspace -c site1,site2,site3 -gpu 0 -t 3"
    )
    return (
        f"# {name}\n\nGenerated by `python -m tooling.jobs` (`make jobs`) from `jobs/{BASE_JOB}`, its entry in "
        f"`custom/fedxvit/methods.py` and the `{GENERATED_JOBS[name][0].__name__}` change in `tooling/jobs.py`: "
        f"edit those, then regenerate; do not edit this folder.\n\n{description}\n\n```bash\n{command}\n```\n\n"
        f"See {'docs/privacy.md' if name in PRIVACY_JOBS else 'docs/federated-jobs.md#algorithms'}.\n"
    )


def render_jobs(jobs_dir: Path) -> dict[Path, str]:
    """{path under jobs_dir: text} of every generated job folder, from jobs_dir/fedxvit."""
    base = Path(jobs_dir) / BASE_JOB
    configs = {}
    for name in (META, SERVER_FILE, CLIENT_FILE):
        configs[name] = read_job_config(base, name)
    copied = {
        path.relative_to(base): path.read_text()
        for path in sorted(base.rglob("*"))
        if path.is_file() and path.relative_to(base) not in (Path(META), SERVER_FILE, CLIENT_FILE)
    }
    files = {}
    for name, (change, description) in GENERATED_JOBS.items():
        job = copy.deepcopy(configs)
        job[CLIENT_FILE]["executors"][0]["executor"]["args"]["algorithm"] = JOBS[name].site_strategy
        change(job[SERVER_FILE], job[CLIENT_FILE])
        job[META]["name"] = name
        files.update({Path(name) / path: config_text(config) for path, config in job.items()})
        files.update({Path(name) / path: text for path, text in copied.items()})
        files[Path(name) / "README.md"] = readme(name, description)
    return files


def differences(jobs_dir: Path) -> list[str]:
    """What differs between the committed job folders and what render_jobs writes (empty: up to date)."""
    jobs_dir = Path(jobs_dir)
    expected = render_jobs(jobs_dir)
    found = {
        path.relative_to(jobs_dir) for name in GENERATED_JOBS for path in (jobs_dir / name).rglob("*") if path.is_file()
    }
    problems = [f"{path}: missing" for path in sorted(set(expected) - found)]
    problems += [f"{path}: not generated (stale?)" for path in sorted(found - set(expected))]
    problems += [
        f"{path}: differs" for path in sorted(set(expected) & found) if (jobs_dir / path).read_text() != expected[path]
    ]
    return problems


def write_jobs(jobs_dir: Path) -> list[Path]:
    jobs_dir = Path(jobs_dir)
    written = []
    for path, text in render_jobs(jobs_dir).items():
        target = jobs_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
            written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs-dir", default=str(project_root() / "jobs"), help="the folder holding jobs/fedxvit")
    parser.add_argument("--check", action="store_true", help="only report generated folders that are out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences(Path(args.jobs_dir))
        if problems:
            raise FedXViTError(f"generated jobs are out of date (run `make jobs`): {'; '.join(problems)}")
        print(f"{len(GENERATED_JOBS)} generated jobs are up to date")
        return 0
    written = write_jobs(Path(args.jobs_dir))
    print("\n".join(str(p) for p in written) or f"{len(GENERATED_JOBS)} generated jobs were already up to date")
    return 0


if __name__ == "__main__":
    run_cli(main)
