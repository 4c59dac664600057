"""Homomorphic encryption (HE) of fedxvit's partial updates, on NVFlare's TenSEAL components.

NVFlare's HE pipeline assumes a site's update covers every tensor of the model: the aggregate's
list of encrypted tensors becomes the global model's, and a site's decryptor looks up every tensor
of the model in it. A fedxvit site sends only its trainable tensors (the freeze policy keeps the
backbone frozen), so the frozen ones are missing from that list and the decryptor stops at the first
of them. HEPartialUpdateAggregator, NVFlare's HE aggregator otherwise unchanged, completes the list:
every tensor of the global model that no update touched is marked "not encrypted" (it never
changes, it is the transplanted expert's). Encryption, aggregation in ciphertext and decryption stay
NVFlare's own.

Cross-site evaluation sends the server's (encrypted) global model to every site. NVFlare's file
model locator hands it over as live CKKS vectors, which the server cannot copy for each site
without the secret key it must not have; SerializedModelLocator hands it over as the ciphertexts'
bytes, as the training rounds do, and each site decrypts it with its own key.

The global model the server saves is ciphertext too. A hospital reads it with its own key:

    python -m fedxvit.he decrypt <run>/app_server/FL_global_model.pt --preset <the job's preset> \
        --context <site startup kit>/client_context.tenseal --out models/he_global_model.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvflare.apis.dxo import DXO, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator

from fedxvit.checkpoint import encrypted_tensors


def decrypt_state(state: dict, context_file: Path, like: dict) -> dict:
    """A saved global model's state with every ciphertext decrypted with the site's TenSEAL context and
    given the shape and dtype of the same tensor in `like` (a model's state_dict)."""
    import tenseal as ts
    import torch

    from fedxvit.errors import FedXViTError

    try:
        context = ts.context_from(Path(context_file).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise FedXViTError(f"--context {context_file}: not a TenSEAL context ({type(exc).__name__}: {exc})") from None
    if not context.has_secret_key():
        raise FedXViTError(
            f"--context {context_file} holds no secret key (it is the server's public context): "
            "use a site's client_context.tenseal"
        )
    out = {}
    for name, value in state.items():
        if name not in like:
            raise FedXViTError(f"the saved model holds {name}, which a model of this preset lacks")
        if isinstance(value, (bytes, bytearray)):
            values = ts.ckks_vector_from(context, value).decrypt()
            tensor = torch.tensor(values, dtype=torch.float64)
            if tensor.numel() != like[name].numel():
                raise FedXViTError(
                    f"{name}: {tensor.numel()} decrypted values, the model's tensor has {like[name].numel()}"
                )
            out[name] = tensor.reshape(like[name].shape).to(like[name].dtype)
        else:
            out[name] = torch.as_tensor(value)
    return out


def complete_processed_keys(processed: dict, model_keys) -> dict:
    """{tensor: encrypted?} for every tensor of the model: the aggregate's entries, False for the others."""
    return {**{key: False for key in model_keys}, **(processed or {})}


class HEPartialUpdateAggregator(HEInTimeAccumulateWeightedAggregator):
    """NVFlare's HE in-time aggregator for updates of some tensors only (see the module doc)."""

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        shareable = super().aggregate(fl_ctx)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or {}
        weights = global_model.get(ModelLearnableKey.WEIGHTS) or {}
        dxo = from_shareable(shareable)
        dxo.set_meta_prop(
            MetaKey.PROCESSED_KEYS, complete_processed_keys(dxo.get_meta_prop(MetaKey.PROCESSED_KEYS), weights)
        )
        return dxo.to_shareable()


class SerializedModelLocator(PTFileModelLocator):
    """NVFlare's PyTorch model locator whose encrypted tensors leave as bytes (see the module doc)."""

    def locate_model(self, model_name, fl_ctx: FLContext) -> DXO:
        dxo = super().locate_model(model_name, fl_ctx)
        serialize_nested_dict(dxo.data)
        return dxo


def decrypt_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="the global model the HE job's server saved (app_server/FL_global_model.pt)")
    parser.add_argument("--context", required=True, help="a site's client_context.tenseal (its startup kit)")
    parser.add_argument("--preset", required=True, help="the job's model preset")
    parser.add_argument("--out", required=True, help="where to write the decrypted checkpoint (with its sidecar)")
    return parser


def decrypt_main(argv=None) -> Path:
    """`python -m fedxvit.he decrypt`: the server's encrypted global model -> a plain fedxvit checkpoint."""
    from fedxvit.errors import ArgumentParser

    return decrypt(decrypt_parser(ArgumentParser(prog="python -m fedxvit.he decrypt")).parse_args(argv))


def decrypt(args: argparse.Namespace) -> Path:
    import torch

    from fedxvit.checkpoint import save_checkpoint
    from fedxvit.classes import TASK_CLASSES
    from fedxvit.errors import FedXViTError
    from fedxvit.model import build_model

    path = Path(args.model)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FedXViTError(f"cannot read global model {path}: {type(exc).__name__}") from None
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise FedXViTError(f"global model {path} holds no state_dict")
    if not encrypted_tensors(state):
        raise FedXViTError(f"global model {path} holds no encrypted tensor: it is readable as it is")
    model = build_model(args.preset, num_classes=len(TASK_CLASSES))
    model.load_state_dict(decrypt_state(state, Path(args.context), model.state_dict()))
    save_checkpoint(args.out, model, {"source": str(path), "decrypted_with": str(args.context)})
    print(f"decrypted {len(encrypted_tensors(state))} tensors of {path} -> {args.out}")
    return Path(args.out)


def main(argv=None) -> Path:
    """`python -m fedxvit.he COMMAND`: the site-side tools of the HE job (today one: decrypt)."""
    from fedxvit.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m fedxvit.he", description="Tools for jobs/fedxvit_he (docs/privacy.md).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decrypt_parser(commands.add_parser("decrypt", help=decrypt_main.__doc__))
    return decrypt(parser.parse_args(argv))


if __name__ == "__main__":
    from fedxvit.errors import run_cli

    run_cli(main)
