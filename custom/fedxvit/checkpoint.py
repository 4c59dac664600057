"""Checkpoints: a plain state_dict `.pt` (loadable with weights_only=True) plus a JSON sidecar.

The sidecar (`<path>.json`) says what the tensors mean -- preset, class names in order,
image size, data hash, metrics -- so a wrong pairing fails with one readable line before
any tensor is touched, instead of a wall of missing/unexpected keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import FedXViTError, read_json
from fedxvit.model import HybridViT, build_model


def sidecar_path(path: os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def save_checkpoint(path: os.PathLike, model: HybridViT, meta: dict | None = None) -> dict:
    """Write the weights and the sidecar; architecture fields come from the model itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.update(
        preset=model.preset.name,
        num_classes=model.num_classes,
        image_size=model.preset.image_size,
        in_chans=model.preset.in_chans,
    )
    names = meta.get("class_names")
    if names is not None and len(names) != model.num_classes:
        raise FedXViTError(f"{path}: {len(names)} class names given for a {model.num_classes}-class model")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # one layout on disk
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint under the real name
    sidecar_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(path: os.PathLike) -> dict:
    """The sidecar of a checkpoint, or one line naming what is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FedXViTError(f"checkpoint {path} does not exist")
    side = sidecar_path(path)
    return read_json(side, f"checkpoint {path} has no sidecar {side}: it was not written by fedxvit.checkpoint")


def load_checkpoint(path: os.PathLike, preset: str | None = None, num_classes: int | None = None) -> tuple[dict, dict]:
    """(state_dict, meta), refusing a checkpoint of another preset or class count than asked for."""
    meta = read_meta(path)
    saved_preset, saved_classes = meta.get("preset"), meta.get("num_classes")
    want_preset = preset or saved_preset
    want_classes = int(num_classes) if num_classes is not None else saved_classes
    if (want_preset, want_classes) != (saved_preset, saved_classes):
        raise FedXViTError(
            f"{path} was saved for preset '{saved_preset}' with {saved_classes} classes, "
            f"but preset '{want_preset}' with {want_classes} classes was asked for"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise FedXViTError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line}") from None
    if not isinstance(state, dict):
        raise FedXViTError(f"checkpoint {path} does not hold a state_dict")
    return state, meta


def build_model_from_checkpoint(
    path: os.PathLike, preset: str | None = None, num_classes: int | None = None, device: str | torch.device = "cpu"
) -> tuple[HybridViT, dict]:
    """The model the checkpoint describes, with its weights loaded, plus the sidecar."""
    state, meta = load_checkpoint(path, preset, num_classes)
    model = build_model(meta["preset"], num_classes=meta["num_classes"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = (
            f"{len(missing)} missing (first: {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected (first: {unexpected[0]})"
        )
        raise FedXViTError(f"checkpoint {path} does not match preset '{meta['preset']}': {what} tensors")
    return model.to(device), meta


def encrypted_tensors(state: dict) -> list[str]:
    """Names of the tensors a saved global model holds as ciphertext (the HE job's server saves TenSEAL bytes)."""
    return [name for name, value in state.items() if isinstance(value, (bytes, bytearray))]


def read_global_state(path: os.PathLike) -> dict:
    """The tensors of a global model saved by NVFlare's PTFileModelPersistor ({"model": state_dict, ...}, no
    sidecar) or of a plain state_dict; one line when it is missing, unreadable or encrypted."""
    path = Path(path)
    if not path.is_file():
        raise FedXViTError(f"global model {path} does not exist: run `make simulate` first (or pass --run-dir)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FedXViTError(
            f"cannot read global model {path}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        ) from None
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise FedXViTError(f"global model {path} holds no state_dict")
    encrypted = encrypted_tensors(state)
    if encrypted:
        raise FedXViTError(
            f"global model {path} holds {len(encrypted)} encrypted tensors (the HE job): decrypt it at a site "
            "first, `python -m fedxvit.he decrypt` with the site's client_context.tenseal"
        )
    return state


def load_global_model(
    path: os.PathLike, preset: str, num_classes: int = len(TASK_CLASSES), device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A global model file (read_global_state) as a `preset` model in eval mode; one line when it is of another
    shape."""
    state = read_global_state(path)
    model = build_model(preset, num_classes=num_classes)
    try:
        missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # tensors of another shape: a model of another preset
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shapes differ")
        raise FedXViTError(f"global model {path} does not fit preset '{preset}': {detail}") from None
    if missing or unexpected:
        what = (
            f"{len(missing)} missing (first: {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected (first: {unexpected[0]})"
        )
        raise FedXViTError(f"global model {path} does not fit preset '{preset}': {what} tensors")
    return model.to(device).eval()
