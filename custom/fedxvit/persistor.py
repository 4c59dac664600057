"""NVFlare's PyTorch file persistor, started from the transplanted 2-class initial model.

The job may not hold absolute paths, and PTFileModelPersistor resolves relative ones inside
the app's custom folder, so this shell finds the checkpoint itself (env
FEDXVIT_INITIAL_MODEL, else <project_root>/models/initial_global.pt, or models/expert.pt for a
4-class job such as the long-tailed scenario's), checks its sidecar
against the job's preset and class count, then hands the absolute path to NVFlare's
persistor, which does everything else (loading, saving the global and best models).
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedxvit.checkpoint import read_meta
from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
from fedxvit.errors import FedXViTError
from fedxvit.model import DEFAULT_PRESET
from fedxvit.paths import project_root

INITIAL_MODEL_ENV = "FEDXVIT_INITIAL_MODEL"
DEFAULT_INITIAL_MODEL = Path("models") / "initial_global.pt"
DEFAULT_EXPERT_MODEL = Path("models") / "expert.pt"  # where a 4-class job starts: the Phase-1 expert


def resolve_initial_model(environ: dict | None = None, num_classes: int = len(TASK_CLASSES)) -> Path:
    """$FEDXVIT_INITIAL_MODEL, else <project_root>/models/initial_global.pt (models/expert.pt for 4 classes)."""
    environ = os.environ if environ is None else environ
    if environ.get(INITIAL_MODEL_ENV):
        return Path(environ[INITIAL_MODEL_ENV]).expanduser().resolve()
    default = DEFAULT_EXPERT_MODEL if num_classes == len(EXPERT_CLASSES) else DEFAULT_INITIAL_MODEL
    return project_root() / default


def check_initial_model(path: Path, preset: str, num_classes: int) -> dict:
    """The sidecar of the initial model, or one line saying why it cannot start this job."""
    if not path.is_file():
        raise FedXViTError(
            f"initial global model {path} does not exist: run `make transfer` "
            f"(or point {INITIAL_MODEL_ENV} at a fedxvit checkpoint)"
        )
    meta = read_meta(path)
    found = (meta.get("preset"), meta.get("num_classes"))
    if found != (preset, num_classes):
        remedy = (
            "rerun `make transfer` for that preset or change the job's preset"
            if num_classes == len(TASK_CLASSES)
            else f"point {INITIAL_MODEL_ENV} at a {num_classes}-class checkpoint of that preset (`make expert`)"
        )
        raise FedXViTError(
            f"initial global model {path} is preset '{found[0]}' with {found[1]} classes, but the job "
            f"asks for preset '{preset}' with {num_classes} classes: {remedy}"
        )
    return meta


class InitialModelPersistor(PTFileModelPersistor):
    """PTFileModelPersistor whose source checkpoint is the project's (checked) initial global model."""

    def __init__(self, preset: str = DEFAULT_PRESET, num_classes: int = len(TASK_CLASSES), **kwargs):
        super().__init__(**kwargs)
        self.preset = preset
        self.num_classes = int(num_classes)

    def load_model(self, fl_ctx: FLContext):
        if not self.source_ckpt_file_full_name:
            try:
                path = resolve_initial_model(num_classes=self.num_classes)
                check_initial_model(path, self.preset, self.num_classes)
            except FedXViTError as exc:
                self.log_error(fl_ctx, f"fedxvit: {exc}")
                self.system_panic(reason=str(exc), fl_ctx=fl_ctx)
                return None
            self.log_info(fl_ctx, f"fedxvit: initial global model {path} (preset {self.preset})")
            self.source_ckpt_file_full_name = str(path)
        return super().load_model(fl_ctx)
