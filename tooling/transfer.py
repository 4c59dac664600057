"""Transfer surgery: the 4-class expert's knowledge into the 2-class federated starting model.

    python -m tooling.transfer --expert models/expert.pt --out models/initial_global.pt
    python -m tooling.transfer --expert <run>/app_server/FL_global_model.pt --preset cpu   (a federated expert)

Every tensor whose name and shape match is copied (CNN, projection, tokens, ViT blocks, norms,
BatchNorm statistics); the classifier, whose shape changes, starts fresh.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from fedxvit.checkpoint import load_checkpoint, load_global_model, read_meta, save_checkpoint, sidecar_path
from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.model import HybridViT, build_model


def transplant(expert_state: dict, target_model: HybridViT) -> dict:
    """Copy name- and shape-matching tensors into target_model (in place); report what moved.

    The target's head is re-initialized first, so it never carries weights from anywhere.
    """
    target_model.reset_head()
    target_state = target_model.state_dict()
    copied, skipped_shape, only_in_expert = [], [], []
    for name, tensor in expert_state.items():
        if name not in target_state:
            only_in_expert.append(name)
        elif tensor.shape != target_state[name].shape:
            skipped_shape.append(name)
        else:
            copied.append(name)
    with torch.no_grad():
        target_model.load_state_dict({**target_state, **{k: expert_state[k] for k in copied}})
    not_copied = [k for k in target_state if k not in copied]
    params = dict(target_model.named_parameters())
    return {
        "copied": copied,
        "not_copied": not_copied,
        "shape_mismatch": skipped_shape,
        "only_in_expert": only_in_expert,
        "copied_tensors": len(copied),
        "copied_values": sum(expert_state[k].numel() for k in copied),
        "copied_parameters": sum(params[k].numel() for k in copied if k in params),
        "copied_buffers": sum(1 for k in copied if k not in params),
        "total_parameters": sum(p.numel() for p in params.values()),
        "fresh_parameters": sum(p.numel() for k, p in params.items() if k not in copied),
    }


def load_expert(path: Path, preset: str | None) -> tuple[dict, dict]:
    """(state, meta) of a central expert (sidecar) or of a federated one: the global model of a 4-class job
    (e.g. jobs/fedxvit_fedmas on data/longtail), which NVFlare's persistor saves without a sidecar."""
    if sidecar_path(path).is_file() or preset is None:
        if not sidecar_path(path).is_file() and path.is_file():
            raise FedXViTError(
                f"--expert {path} has no sidecar: for a federated expert (FL_global_model.pt) give its --preset"
            )
        return load_checkpoint(path, preset)  # a --preset other than the sidecar's is refused, not ignored
    model = load_global_model(path, preset, num_classes=len(EXPERT_CLASSES))
    meta = {"preset": preset, "num_classes": model.num_classes, "class_names": list(EXPERT_CLASSES), "federated": True}
    return model.state_dict(), meta


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m tooling.transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--expert",
        default="models/expert.pt",
        help="expert checkpoint (with .json sidecar), or a federated expert (FL_global_model.pt, with --preset)",
    )
    parser.add_argument("--preset", default=None, help="preset of a federated expert, which has no sidecar")
    parser.add_argument("--out", default="models/initial_global.pt", help="initial global model to write")
    parser.add_argument("--num-classes", type=int, default=len(TASK_CLASSES), help="classes of the federated task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh head")
    parser.add_argument(
        "--force", action="store_true", help="replace --out even if it is not an earlier output of this tool"
    )
    return parser.parse_args(argv)


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace a file this tool did not write (a checkpoint without a transfer sidecar) unless --force."""
    if not out.exists() or force:
        return
    try:
        written_here = "transplanted_from" in read_meta(out)
    except FedXViTError:
        written_here = False
    if not written_here:
        raise FedXViTError(
            f"--out {out} exists and was not written by tooling.transfer: choose another --out or --force"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out(Path(args.out), args.force)
    state, meta = load_expert(Path(args.expert), args.preset)
    if args.num_classes == len(TASK_CLASSES):
        class_names = list(TASK_CLASSES)
    elif args.num_classes >= 2:
        class_names = [f"class{i}" for i in range(args.num_classes)]
    else:
        raise FedXViTError(f"--num-classes must be at least 2, got {args.num_classes}")
    torch.manual_seed(args.seed)
    target = build_model(meta["preset"], num_classes=args.num_classes)
    report = transplant(state, target)
    save_checkpoint(
        args.out,
        target,
        {
            "class_names": class_names,
            "data_hash": None,
            "transplanted_from": {
                "checkpoint": os.fspath(args.expert),
                "federated": bool(meta.get("federated")),
                "class_names": meta.get("class_names"),
                "data_hash": meta.get("data_hash"),
                "metrics": meta.get("metrics", {}),
            },
            "transplant": {
                k: report[k] for k in ("copied_tensors", "copied_parameters", "total_parameters", "not_copied")
            },
            "seed": args.seed,
        },
    )
    print(
        f"transfer: {args.expert} (preset '{meta['preset']}', {meta['num_classes']} classes {meta.get('class_names')}) "
        f"-> {args.out} ({args.num_classes} classes {class_names})"
    )
    print(
        f"  transplanted: {report['copied_tensors']} tensors ({report['copied_buffers']} of them BatchNorm buffers), "
        f"{report['copied_parameters']:,} of {report['total_parameters']:,} parameters "
        f"({100 * report['copied_parameters'] / report['total_parameters']:.2f}%)"
    )
    print(
        f"  re-initialized: {', '.join(report['not_copied']) or 'nothing'} ({report['fresh_parameters']:,} parameters)"
    )
    if report["shape_mismatch"]:
        print(f"  not copied (shape differs): {', '.join(report['shape_mismatch'])}")
    if report["only_in_expert"]:
        print(f"  not copied (absent in target): {', '.join(report['only_in_expert'])}")
    print(f"wrote {args.out} and {args.out}.json")
    return report


if __name__ == "__main__":
    run_cli(main)
