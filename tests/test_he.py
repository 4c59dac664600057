"""Homomorphic encryption (jobs/fedxvit_he): the server only ever holds ciphertext, and aggregating
ciphertext gives the model plain FedAvg gives.

The end-to-end test is in test_poc.py: it runs the HE job on the one POC system provisioned for HE
(`nvflare poc prepare -he`) and compares it with the shared plain FedAvg simulator run."""

import numpy as np
import pytest
import tenseal as ts
import torch

from fedxvit.checkpoint import encrypted_tensors, load_global_model
from fedxvit.errors import FedXViTError
from fedxvit.executor import to_torch_state
from fedxvit.filters import update_size
from fedxvit.he import complete_processed_keys, decrypt_state
from fedxvit.model import build_model


def ckks_context(secret: bool = True):
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    context.global_scale = 2**40
    if not secret:
        context.make_context_public()
    return context


def test_frozen_tensors_are_marked_clear_and_the_aggregates_entries_are_kept():
    keys = complete_processed_keys({"head.weight": True}, ["backbone.w", "head.weight"])
    assert keys == {"backbone.w": False, "head.weight": True}


def test_update_size_counts_ciphertext_and_clear_tensors_apart():
    clear = np.zeros((3, 4), dtype=np.float32)
    encrypted = ts.ckks_vector(ckks_context(), [0.5] * 12)
    sizes = update_size({"a": clear, "b": encrypted, "c": encrypted.serialize()})
    assert (sizes["tensors"], sizes["encrypted"], sizes["in_clear"]) == (3, 2, 1)
    assert sizes["bytes"] == 48 + 2 * len(encrypted.serialize()) and sizes["values"] == 12 + 12


def test_a_decrypted_model_gets_its_shapes_back_and_a_public_context_cannot_decrypt(tmp_path):
    context = ckks_context()
    (tmp_path / "client.tenseal").write_bytes(context.serialize(save_secret_key=True))
    public = context.copy()
    public.make_context_public()
    (tmp_path / "server.tenseal").write_bytes(public.serialize())
    like = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)}
    values = np.arange(6, dtype=np.float64) / 10
    state = {"w": ts.ckks_vector(context, values).serialize(), "n": np.array(7)}
    assert encrypted_tensors(state) == ["w"]
    plain = decrypt_state(state, tmp_path / "client.tenseal", like)
    assert plain["w"].shape == (2, 3) and torch.allclose(
        plain["w"], torch.tensor(values).reshape(2, 3).float(), atol=1e-5
    )
    assert int(plain["n"]) == 7
    with pytest.raises(FedXViTError, match="server.tenseal holds no secret key"):
        decrypt_state(state, tmp_path / "server.tenseal", like)


def test_flat_decrypted_tensors_take_the_receiving_models_shapes():
    model = build_model("tiny", num_classes=2)
    own = model.state_dict()
    flat = {name: value.flatten().double().numpy() for name, value in own.items()}
    state = to_torch_state(flat, like=own)
    assert all(state[name].shape == own[name].shape and state[name].dtype == own[name].dtype for name in own)
    model.load_state_dict(state)


def test_an_encrypted_global_model_is_refused_with_the_way_to_decrypt_it(tmp_path):
    model = build_model("tiny", num_classes=2)
    state = {k: v for k, v in model.state_dict().items()}
    state["head.bias"] = b"ciphertext"
    torch.save({"model": state}, tmp_path / "FL_global_model.pt")
    with pytest.raises(FedXViTError, match="1 encrypted tensors .*python -m fedxvit.he decrypt"):
        load_global_model(tmp_path / "FL_global_model.pt", "tiny")
