"""The hospital side of the job: a thin NVFlare Executor over fedxvit.training.

Per `train` task: load the global weights, score them on local validation data (the
server's model selector and global-accuracy widget read that score), fine-tune for the
configured epochs under the freeze policy, and send back only the trainable tensors'
differences as float32 numpy arrays -- the same array type NVFlare's PT persistor hands out
(allow_numpy_conversion), so FullModelShareableGenerator adds like to like. Images never
leave the site. `validate` and `submit_model` serve NVFlare's cross-site evaluation.

The federated algorithm is a strategy (fedxvit.algorithms, job option `algorithm`): FedProx adds
its proximal term to the loss; SCAFFOLD reads the global control variates from the task (a DXO
COLLECTION from NVFlare's ScatterAndGatherScaffold), corrects each step and returns its
control-variate change in a COLLECTION beside the weight difference.

Long-tailed data (fedxvit.imbalance): `loss: bsm` trains with Balanced Softmax on the site's own class
counts; with `mas_prior` the site measures its model against the frozen self-supervised prior before
and after training and sends the resulting MAS factor in the result's meta for the server's weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants

from fedxvit.algorithms import RoundAborted, SiteTraining, make_strategy
from fedxvit.checkpoint import load_checkpoint, save_checkpoint
from fedxvit.classes import TASK_CLASSES, task_classes
from fedxvit.data import make_loader
from fedxvit.datalist import load_split, read_dataset_info
from fedxvit.errors import FedXViTError
from fedxvit.frozen_tensors import FrozenTensors
from fedxvit.imbalance import balanced_softmax_shift, check_loss, class_counts, mas_factor, measure_divergence
from fedxvit.model import DEFAULT_PRESET, build_model, training_defaults
from fedxvit.paths import job_path
from fedxvit.protocol import (
    MAS_FACTOR,
    MAS_PRIOR,
    REJECT_REASON_HEADER,
    REPLICATES_HEADER,
    SEED_HEADER,
    site_epoch_metrics,
    site_round_metrics,
)
from fedxvit.site_policy import allowed_metrics, job_default, site_may_leave
from fedxvit.site_scores import bootstrap_confusions, site_aggregates
from fedxvit.sites import site_data_dir
from fedxvit.training import (
    FREEZE_POLICIES,
    apply_freeze_policy,
    evaluate,
    make_optimizer,
    resolve_device,
    seed_everything,
    shared_state_keys,
    train_epoch,
    weight_diff,
)

BEST_LOCAL_MODEL = "best_local_model.pt"
TORCH_THREADS_ENV = "FEDXVIT_TORCH_THREADS"


def resolve_torch_threads(setting: str | int = "auto", parallel_clients: int = 1, environ: dict | None = None) -> int:
    """CPU threads for this client's torch ops: the job's number, else $FEDXVIT_TORCH_THREADS (a site's
    own choice), else `auto`: the usable cores shared evenly by the client processes on this machine,
    so that simulated clients do not each grab every core (oversubscribed OpenMP threads spin)."""
    environ = os.environ if environ is None else environ
    if str(setting) != "auto":
        return max(1, int(setting))
    if environ.get(TORCH_THREADS_ENV):
        try:
            return max(1, int(environ[TORCH_THREADS_ENV]))
        except ValueError:
            raise FedXViTError(f"${TORCH_THREADS_ENV}={environ[TORCH_THREADS_ENV]!r} is not a whole number") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(parallel_clients)))


def simulator_parallel_clients(fl_ctx: FLContext) -> int:
    """How many client processes may share this machine: 1, except in NVFlare's simulator.

    NVFlare marks a simulated run publicly (FLContextKey.SIMULATE_MODE) and lists the job's
    clients in the job meta (JobMetaKey.JOB_CLIENTS). The simulator's `-t` is not public; the
    client count is its upper bound (-t never exceeds it), so `auto` never oversubscribes.
    Set a number in the job or $FEDXVIT_TORCH_THREADS where -t is lower than the client count.
    """
    if not fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False):
        return 1
    meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
    return max(1, len(meta.get(JobMetaKey.JOB_CLIENTS.value) or []))


def job_option(name: str, value, kind=int, minimum: float = 1):
    """A numeric job option as `kind`, at least `minimum` (learning rates: above 0), or one line naming it."""
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and number != float(value)):
            raise ValueError
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise FedXViTError(f"job option {name}={value!r} is not {what}") from None
    if (kind is float and not number > 0) or (kind is int and number < minimum):
        bound = "above 0" if kind is float else f"at least {minimum}"
        raise FedXViTError(f"job option {name}={value!r} must be {bound}")
    return number


def to_torch_state(weights: dict, like: dict | None = None) -> dict:
    """DXO weights (numpy arrays, lists or tensors) -> CPU tensors, dtypes kept (BN counters stay int64).

    With `like` (the receiving model's state), a tensor with the right number of values takes that model's
    shape and dtype: NVFlare's HE decryptor hands decrypted tensors back flat, in float64."""
    state = {}
    for name, value in weights.items():
        tensor = value.cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        own = (like or {}).get(name)
        if own is not None and tensor.numel() == own.numel() and (tensor.shape, tensor.dtype) != (own.shape, own.dtype):
            tensor = tensor.reshape(own.shape).to(own.dtype)
        state[name] = tensor
    return state


def to_numpy_state(state: dict) -> dict:
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def trainable_weight_diff(new_state: dict, old_state: dict, trainable: list[str]) -> dict:
    """Float32 numpy differences of the trainable tensors only: all a site sends."""
    return {name: diff.float().numpy() for name, diff in weight_diff(new_state, old_state, trainable).items()}


def read_train_task(dxo: DXO) -> tuple[dict, dict | None, dict]:
    """(global weights, global SCAFFOLD control variates or None, other parts {name: DXO}) of a `train` task:
    a WEIGHTS DXO, or a COLLECTION of the weights and ScatterAndGatherScaffold's controls or FedSM's models."""
    controls, parts = None, {}
    if dxo.data_kind == DataKind.COLLECTION:
        parts = dict(dxo.data or {})
        weights_dxo, controls_dxo = (
            parts.pop(AppConstants.MODEL_WEIGHTS, None),
            parts.pop(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL, None),
        )
        if not isinstance(weights_dxo, DXO) or not (isinstance(controls_dxo, DXO) or parts):
            raise FedXViTError(
                f"train task COLLECTION holds {sorted(dxo.data or {})}, expected {AppConstants.MODEL_WEIGHTS} "
                f"and {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL} (or FedSM's parts)"
            )
        dxo, controls = weights_dxo, (controls_dxo.data if isinstance(controls_dxo, DXO) else None)
    if dxo.data_kind != DataKind.WEIGHTS:
        raise FedXViTError(f"train task expects WEIGHTS, got {dxo.data_kind}")
    return dxo.data, controls, parts


def train_result(diff: dict, meta: dict, control_deltas: dict | None = None, parts: dict | None = None) -> DXO:
    """The WEIGHT_DIFF DXO a site sends; with SCAFFOLD's control-variate change or a strategy's parts (FedSM's
    models), a COLLECTION of them all, as ScatterAndGatherScaffold and FedSM's assembler expect. The meta
    (steps, scores) sits on the outer DXO, where the model selector and the global-validation widget read
    it, and on the weights."""
    update = DXO(data_kind=DataKind.WEIGHT_DIFF, data=diff, meta=dict(meta))
    if not control_deltas and not parts:
        return update
    data = {AppConstants.MODEL_WEIGHTS: update, **(parts or {})}
    if control_deltas:
        data[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = DXO(data_kind=DataKind.WEIGHT_DIFF, data=control_deltas)
    return DXO(data_kind=DataKind.COLLECTION, meta=dict(meta), data=data)


class FedXViTExecutor(Executor):
    """train / validate / submit_model for one hospital; every knob is a job argument."""

    def __init__(
        self,
        preset: str = DEFAULT_PRESET,
        local_epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        freeze_policy: str = "last-k",
        last_k: int = 1,
        torch_threads: str | int = "auto",
        seed: int = 0,
        num_classes: int = len(TASK_CLASSES),
        loss: str = "ce",
        mas_prior: str = "",
        algorithm: str = "fedavg",
        mu: float = 0.01,
        ditto_lambda: float = 0.1,
        personal_epochs: int = 1,
        dp_epsilon: float = 0.0,
        dp_delta: float = 1e-5,
        dp_max_grad_norm: float = 1.0,
        num_workers: int = 0,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        evaluate_task_name: str = "evaluate",
        explain_images: int = 0,
        analytic_sender_id: str = "log_writer",
        may_leave: str = "all",
    ):
        super().__init__()
        # Every option is checked here, when NVFlare builds the site's app and before its first task, so a bad
        # job variable stops the run with one line naming it instead of failing inside a task.
        defaults = training_defaults(preset).site  # what the job does not set comes from the preset's training defaults
        self.preset = preset
        self.local_epochs = job_option("local_epochs", defaults.local_epochs if local_epochs is None else local_epochs)
        self.learning_rate = job_option(
            "learning_rate", defaults.learning_rate if learning_rate is None else learning_rate, float
        )
        self.batch_size = job_option("batch_size", defaults.batch_size if batch_size is None else batch_size)
        if freeze_policy not in FREEZE_POLICIES:
            raise FedXViTError(
                f"job option freeze_policy={freeze_policy!r} is unknown; choose one of {', '.join(FREEZE_POLICIES)}"
            )
        self.freeze_policy = freeze_policy
        self.last_k = job_option("last_k", last_k)
        if str(torch_threads) != "auto":
            job_option("torch_threads", torch_threads)
        self.torch_threads = torch_threads
        self.seed = job_option("seed", seed, minimum=0)
        self.num_classes = job_option("num_classes", num_classes, minimum=2)
        self.loss = check_loss(loss)
        self.mas_prior_path = mas_prior  # the frozen self-supervised encoder MAS measures with ("" = no MAS)
        self.logit_shift = None  # Balanced Softmax's log class counts (loss "bsm"), from the training split
        self.prior, self.prior_sha256, self.features_loader = None, "", None
        self.class_names = list(TASK_CLASSES)
        self.algorithm = algorithm
        # an unknown algorithm or a bad option of it fails the job at start
        self.strategy = make_strategy(algorithm, mu, ditto_lambda, personal_epochs)
        self.privacy = None  # DP-SGD (fedxvit.privacy) when dp_epsilon > 0
        if float(dp_epsilon) > 0:
            if algorithm == "fedprox":
                raise FedXViTError(
                    "job options dp_epsilon and algorithm='fedprox' do not combine: DP-SGD noises per-image "
                    "gradients and would silently drop FedProx's proximal term; use fedavg, scaffold or ditto"
                )
            if mas_prior:
                raise FedXViTError(
                    "job options dp_epsilon and mas_prior do not combine: the MAS factor is measured on the training "
                    "images outside DP-SGD's privacy accounting; drop one of them"
                )
            if algorithm == "fedsm":
                raise FedXViTError(
                    "job options dp_epsilon and algorithm='fedsm' do not combine: FedSM's personalized model and "
                    "selector would leave the site trained without DP-SGD; use fedavg, scaffold or ditto"
                )
            if freeze_policy == "full":
                raise FedXViTError(
                    "job options dp_epsilon and freeze_policy='full' do not combine: 'full' trains BatchNorm, whose "
                    "per-image gradients and running statistics DP-SGD (Opacus) cannot bound; use "
                    "'full-but-batchnorm', 'last-k' or 'head'"
                )
            try:  # Opacus only where DP-SGD is asked for: `pip install fedxvit[dp]`
                from fedxvit.privacy import SitePrivacy
            except ImportError as exc:
                raise FedXViTError(
                    f"job option dp_epsilon={dp_epsilon} needs Opacus ({exc}): pip install 'fedxvit[dp]'"
                ) from None
            self.privacy = SitePrivacy(dp_epsilon, dp_delta, dp_max_grad_norm)
        self.num_workers = int(num_workers)
        self.task_names = {
            "train": train_task_name,
            "validate": validate_task_name,
            "submit": submit_model_task_name,
            "evaluate": evaluate_task_name,
        }
        self.data_dir = self.test_loader = None
        if isinstance(explain_images, bool) or not isinstance(explain_images, int) or explain_images < 0:
            raise FedXViTError(f"job option explain_images={explain_images!r}: a whole number >= 0")
        self.explain_images = explain_images  # evaluate task: masked tumor test images scored per explanation
        self.model = None
        self.frozen = None  # the frozen tensors this site holds, so the server may leave them out (fedxvit.downlink)
        self.device = None
        self.train_loader = self.val_loader = None
        self.best_local_accuracy = -1.0
        self.best_model_path: Path | None = None
        self.site_name = "?"
        self.analytic_sender_id = analytic_sender_id
        self.writer = None  # NVFlare's MLflowWriter: metrics travel to the server's receivers as analytics events
        self.may_leave_default, self.may_leave = may_leave, job_default(may_leave)  # the site's answer at setup

    # ---- setup, once per run, lazily so a data problem fails the first task cleanly
    def _setup(self, fl_ctx: FLContext) -> None:
        if self.model is not None:
            return
        self.site_name = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        data_dir = site_data_dir(
            self.site_name, site_config_dir=workspace.get_site_config_dir(), class_names=task_classes(self.num_classes)
        )
        self.data_dir = data_dir
        threads = resolve_torch_threads(self.torch_threads, simulator_parallel_clients(fl_ctx))
        torch.set_num_threads(threads)
        self.device = resolve_device()
        seed_everything(self.seed)
        info = read_dataset_info(data_dir)
        self.class_names = list(info.get("class_names") or TASK_CLASSES)
        if len(self.class_names) != self.num_classes:
            raise FedXViTError(
                f"site {self.site_name}: {data_dir} holds {len(self.class_names)} classes "
                f"({', '.join(self.class_names)}) but the job trains a {self.num_classes}-class model "
                "(job option num_classes)"
            )
        model = build_model(self.preset, num_classes=self.num_classes)
        size = model.preset.image_size
        self.train_loader = make_loader(
            data_dir, "training", size, self.batch_size, train=True, num_workers=self.num_workers, seed=self.seed
        )
        self.val_loader = make_loader(
            data_dir, "validation", size, self.batch_size, train=False, num_workers=self.num_workers
        )
        self.model = model.to(self.device)
        if self.freeze_policy != "full":  # `full` trains (and sends) every tensor but a counter: nothing to leave out
            sent = shared_state_keys(model, apply_freeze_policy(model, self.freeze_policy, self.last_k))
            self.frozen = FrozenTensors(self.site_name, sent)
        if self.loss == "bsm":  # counted here, never sent
            labels = [int(item["label"]) for item in load_split(data_dir, "training")]
            self.logit_shift = balanced_softmax_shift(class_counts(labels, self.num_classes)).to(self.device)
        if self.mas_prior_path:
            from fedxvit.ssl_prior import load_prior

            self.prior, self.prior_sha256 = load_prior(job_path("mas_prior", self.mas_prior_path), self.device)
            self.features_loader = make_loader(data_dir, "training", size, self.batch_size, train=False)
        self.writer = fl_ctx.get_engine().get_component(self.analytic_sender_id) if self.analytic_sender_id else None
        self.may_leave, _ = site_may_leave(workspace.get_site_config_dir(), self.may_leave_default)
        if self.writer is not None:  # the run's settings and the data's content hash, never paths or images
            self.writer.log_params(
                {
                    "preset": self.preset,
                    **self.strategy.params(),
                    "freeze_policy": self.freeze_policy,
                    "last_k": self.last_k,
                    "local_epochs": self.local_epochs,
                    "learning_rate": self.learning_rate,
                    "batch_size": self.batch_size,
                    "seed": self.seed,
                    "loss": self.loss,
                    "mas": bool(self.mas_prior_path),
                    "data_hash": info.get("data_hash", "unknown"),
                }
            )
        app_dir = fl_ctx.get_prop(FLContextKey.APP_ROOT) or workspace.get_app_dir(fl_ctx.get_job_id())
        self.best_model_path = Path(app_dir) / BEST_LOCAL_MODEL
        self.strategy.attach(
            SiteTraining(
                new_model=self._new_model,
                train_loader=self.train_loader,
                val_loader=self.val_loader,
                device=self.device,
                learning_rate=self.learning_rate,
                app_dir=Path(app_dir),
            )
        )
        self.log_info(
            fl_ctx,
            f"fedxvit {self.site_name}: data {data_dir.name} ({len(self.train_loader.dataset)} train, "
            f"{len(self.val_loader.dataset)} val), preset {self.preset}, algorithm "
            f"{self.algorithm}, loss {self.loss}{', MAS prior ' + self.prior_sha256[:12] if self.prior else ''}, "
            f"device {self.device}, "
            f"{threads} torch thread(s)",
        )

    def _new_model(self, num_classes: int | None = None) -> torch.nn.Module:
        """Another model of the job's preset with its freeze policy, on the site's device (a personalized
        model; FedSM's selector, with one output per site)."""
        model = build_model(self.preset, num_classes=num_classes or self.num_classes).to(self.device)
        apply_freeze_policy(model, self.freeze_policy, self.last_k)
        return model

    def _load_weights(self, weights: dict) -> None:
        state = to_torch_state(weights, like=self.model.state_dict())
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise FedXViTError(
                f"received weights hold {len(unexpected)} tensors this '{self.preset}' model lacks "
                f"(first: {unexpected[0]}): server and client presets differ"
            )
        if missing:
            raise FedXViTError(f"received weights lack {len(missing)} tensors (first: {missing[0]})")

    # ---- NVFlare entry point
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        handlers = {
            self.task_names["train"]: self._train,
            self.task_names["validate"]: self._validate,
            self.task_names["submit"]: self._submit_model,
            self.task_names["evaluate"]: self._evaluate,
        }
        handler = handlers.get(task_name)
        if handler is None:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            self._setup(fl_ctx)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            if self.frozen is not None:  # a model left without the frozen tensors is completed; a whole one kept
                self.frozen.receive(shareable, fl_ctx)
            return handler(shareable, fl_ctx, abort_signal)
        except FedXViTError as exc:
            self.log_error(fl_ctx, f"fedxvit: {exc}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _track(self, metrics: dict, step) -> None:
        """Metrics to the server's TensorBoard/MLflow receivers as NVFlare analytics events (no-op without a writer)."""
        if self.writer is not None and isinstance(step, int):
            for tag, value in allowed_metrics(metrics, self.may_leave).items():
                self.writer.log_metric(tag, value, step=step)

    def _scores(self, abort_signal: Signal) -> dict | None:
        """The model's local validation scores; None when the task was aborted while scoring."""
        result = evaluate(self.model, self.val_loader, self.device, should_abort=lambda: abort_signal.triggered)
        if result["aborted"]:
            return None
        return {"val_accuracy": result["accuracy"], "val_loss": result["loss"], "val_count": result["count"]}

    def _aborted(self, fl_ctx: FLContext, while_doing: str) -> Shareable:
        self.log_info(fl_ctx, f"fedxvit {self.site_name}: task aborted {while_doing}")
        return make_reply(ReturnCode.TASK_ABORTED)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        weights, global_controls, parts = read_train_task(from_shareable(shareable))
        if global_controls is not None and not self.strategy.needs_global_controls:
            raise FedXViTError(
                f"the server sent SCAFFOLD control variates but this site runs algorithm "
                f"'{self.algorithm}': use the same job's client config (algorithm 'scaffold')"
            )
        unexpected = sorted(set(parts) - set(self.strategy.task_parts))
        if unexpected:
            raise FedXViTError(
                f"the server sent {', '.join(unexpected)} but this site runs algorithm '{self.algorithm}': "
                "use the same job's client config"
            )
        if self.strategy.task_parts:
            self.strategy.receive(parts, self.site_name)
        self._load_weights(weights)
        global_state = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, "?")
        started = time.perf_counter()
        initial_metrics = self._scores(abort_signal)
        global_val_s = time.perf_counter() - started
        if initial_metrics is None:
            return self._aborted(fl_ctx, f"while scoring the global model of round {current_round}")
        divergence_before = self._divergence(abort_signal)
        if self.prior is not None and divergence_before is None:
            return self._aborted(fl_ctx, f"while measuring the global model of round {current_round}")

        trainable = shared_state_keys(self.model, apply_freeze_policy(self.model, self.freeze_policy, self.last_k))
        optimizer = make_optimizer(self.model, self.learning_rate)
        train_loader = self.train_loader
        if self.privacy is not None:
            if not self.privacy.started:
                planned = int(shareable.get_header(AppConstants.NUM_ROUNDS, 0) or 0) * self.local_epochs
                self.privacy.start(self.model, self.train_loader, planned)
            if not self.privacy.budget_left_for(self.local_epochs):
                return self._budget_spent(fl_ctx, current_round)
            optimizer, train_loader = self.privacy.private(optimizer), self.privacy.loader
        self.strategy.start_round(self.model, optimizer, global_controls)
        steps, history = 0, []
        started = time.perf_counter()
        for epoch in range(self.local_epochs):
            epoch_metrics = train_epoch(
                self.model,
                train_loader,
                optimizer,
                self.device,
                should_abort=lambda: abort_signal.triggered,
                extra_loss=self.strategy.extra_loss,
                after_step=self.strategy.after_step,
                logit_shift=self.logit_shift,
            )
            if epoch_metrics["aborted"]:
                return self._aborted(fl_ctx, f"while training in round {current_round}")
            steps += epoch_metrics["steps"]
            history.append(epoch_metrics)
            if isinstance(current_round, int):
                self._track(site_epoch_metrics(epoch_metrics), current_round * self.local_epochs + epoch)

        training_s = time.perf_counter() - started
        private = {}
        if self.privacy is not None:  # accounted step by step as they ran (an aborted round's steps too)
            private = {"dp_epsilon": self.privacy.spent()}
        started = time.perf_counter()
        local_metrics = self._scores(abort_signal)
        local_val_s = time.perf_counter() - started
        if local_metrics is None:
            return self._aborted(fl_ctx, f"while scoring the local model of round {current_round}")
        if local_metrics["val_accuracy"] > self.best_local_accuracy:
            self.best_local_accuracy = local_metrics["val_accuracy"]
            save_checkpoint(
                self.best_model_path,
                self.model,
                meta={
                    "class_names": self.class_names,
                    "site": self.site_name,
                    "round": current_round,
                    "val_accuracy": local_metrics["val_accuracy"],
                    "val_loss": local_metrics["val_loss"],
                },
            )

        try:
            control_deltas = self.strategy.finish_round(should_abort=lambda: abort_signal.triggered)
        except RoundAborted as stopped:
            return self._aborted(fl_ctx, f"{stopped} in round {current_round}")
        mas = {}
        if self.prior is not None:  # one number per round leaves the site: how its divergence is spread
            divergence_after = self._divergence(abort_signal)
            if divergence_after is None:
                return self._aborted(fl_ctx, f"while measuring the local model of round {current_round}")
            mas = {MAS_FACTOR: mas_factor(divergence_before, divergence_after), MAS_PRIOR: self.prior_sha256}
        new_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        diff = trainable_weight_diff(new_state, global_state, trainable)
        last = history[-1] if history else {"loss": float("nan"), "accuracy": float("nan")}
        train_metrics = {
            "train_loss": last["loss"],
            "train_accuracy": last["accuracy"],
            "steps": steps,
            "local_val_accuracy": local_metrics["val_accuracy"],
            "local_val_loss": local_metrics["val_loss"],
        }
        self._track(
            {
                **site_round_metrics(initial_metrics, train_metrics),
                **self.strategy.round_metrics(),
                **private,
                **({MAS_FACTOR: mas[MAS_FACTOR]} if mas else {}),
            },
            current_round,
        )
        self.log_info(
            fl_ctx,
            f"fedxvit {self.site_name} round {current_round}: global val_acc="
            f"{initial_metrics['val_accuracy']:.4f} val_loss={initial_metrics['val_loss']:.6f} -> "
            f"local val_acc={local_metrics['val_accuracy']:.4f}, "
            f"train_loss={last['loss']:.4f}, {steps} steps, {len(diff)} tensors sent (seconds: global val "
            f"{global_val_s:.3f}, training {training_s:.3f}, local val {local_val_s:.3f}); "
            f"{self.strategy.summary()}"
            + (f"; {self.privacy.summary()}" if self.privacy is not None else "")
            + (f"; MAS factor {mas[MAS_FACTOR]:.4f}" if mas else ""),
        )
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: steps,
            MetaKey.INITIAL_METRICS: initial_metrics,
            "train_metrics": train_metrics,
            **private,
            **mas,
        }
        return train_result(diff, meta, control_deltas, self.strategy.parts()).to_shareable()

    def _divergence(self, abort_signal: Signal) -> list | None:
        """Per-class divergence of the current model from the MAS prior on the training images (None: no MAS
        or aborted)."""
        if self.prior is None:
            return None
        return measure_divergence(
            self.model, self.prior, self.features_loader, self.device, self.num_classes, lambda: abort_signal.triggered
        )

    def _budget_spent(self, fl_ctx: FLContext, current_round) -> Shareable:
        """This site's privacy budget cannot pay for another round: it stops sending (the round goes on without it)."""
        reason = (
            f"privacy budget spent: another round would raise epsilon from {self.privacy.spent():.3g} to "
            f"{self.privacy.would_spend(self.local_epochs):.3g}, over dp_epsilon={self.privacy.target_epsilon:g}"
        )
        self.log_warning(fl_ctx, f"fedxvit {self.site_name} round {current_round}: not training: {reason}")
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply.set_header(REJECT_REASON_HEADER, reason)
        return reply

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise FedXViTError(f"validate task expects WEIGHTS, got {dxo.data_kind}")
        self._load_weights(dxo.data)
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "global")
        metrics = self._scores(abort_signal)
        if metrics is None:
            return self._aborted(fl_ctx, f"while validating the model of {owner}")
        self.log_info(
            fl_ctx,
            f"fedxvit {self.site_name}: model of {owner} val_acc={metrics['val_accuracy']:.4f} "
            f"val_loss={metrics['val_loss']:.4f} (n={metrics['val_count']})",
        )
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _evaluate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """A model scored on this site's test split; only counts and histograms go back (fedxvit.evaluation)."""
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise FedXViTError(f"evaluate task expects WEIGHTS, got {dxo.data_kind}")
        self._load_weights(dxo.data)
        if self.test_loader is None:
            size = self.model.preset.image_size
            self.test_loader = make_loader(self.data_dir, "testing", size, self.batch_size, train=False)
        result = evaluate(self.model, self.test_loader, self.device, should_abort=lambda: abort_signal.triggered)
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "global")
        if result["aborted"]:
            return self._aborted(fl_ctx, f"while evaluating the model of {owner}")
        aggregates = site_aggregates(result["labels"], result["probs"], self.class_names)
        seed = shareable.get_header(SEED_HEADER)
        if seed is not None:
            aggregates["bootstrap_confusions"] = bootstrap_confusions(
                result["labels"],
                np.argmax(result["probs"], axis=1),
                self.num_classes,
                seed,
                self.site_name,
                int(shareable.get_header(REPLICATES_HEADER, 200)),
            )
        if self.explain_images:
            from fedxvit.explain import explanation_scores  # Captum and SciPy: the wheel's `explain` extra

            aggregates["explanations"] = explanation_scores(self.model, self.data_dir, self.explain_images)
        self.log_info(fl_ctx, f"fedxvit {self.site_name}: model of {owner} evaluated on {result['count']} test images")
        return DXO(data_kind=DataKind.METRICS, data=aggregates).to_shareable()

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.best_model_path is None or not self.best_model_path.is_file():
            self.log_error(fl_ctx, f"fedxvit {self.site_name}: no best local model yet (no train task finished)")
            return make_reply(ReturnCode.EMPTY_RESULT)
        state, _ = load_checkpoint(self.best_model_path, self.preset, self.num_classes)
        return DXO(data_kind=DataKind.WEIGHTS, data=to_numpy_state(state)).to_shareable()
