"""Homomorphic encryption (jobs/fedxvit_he): the server only ever holds ciphertext, and aggregating
ciphertext gives the model plain FedAvg gives.

The end-to-end test runs the HE job in NVFlare's real POC deployment provisioned for HE (`nvflare
poc prepare -he`) and the plain FedAvg job in the simulator, on the same tiny sites, initial model,
rounds and seeds, then compares what the server received and the final models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tenseal as ts
import torch
from tiny import REPO, SITES, free_port, simulate, tiny_job, tiny_sites_and_initial_model

from fedxvit.checkpoint import encrypted_tensors, load_global_model
from fedxvit.errors import FedXViTError
from fedxvit.executor import to_torch_state
from fedxvit.filters import UPDATE_SIZES_FILE, update_size
from fedxvit.he import complete_processed_keys, decrypt_main, decrypt_state
from fedxvit.model import build_model

ROUNDS = 2


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


@pytest.mark.slow
def test_he_in_poc_sends_only_ciphertext_and_matches_plain_fedavg(tmp_path):
    initial = tiny_sites_and_initial_model(tmp_path)
    settings = dict(num_rounds=ROUNDS, wait_time_after_min_received=5, submit_model_timeout=10, validation_timeout=60)
    (tmp_path / "he").mkdir()
    he_job = tiny_job(tmp_path / "he", job_dir=REPO / "jobs" / "fedxvit_he", **settings)
    env = dict(
        os.environ,
        FEDXVIT_INITIAL_MODEL=str(initial),
        FEDXVIT_DATA_ROOT=str(tmp_path / "data"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    poc = tmp_path / "poc"
    command = [sys.executable, "-m", "fedxvit.poc", "--job", str(he_job), "--workspace", str(poc)]
    command += ["--out", str(tmp_path / "results"), "--port", str(free_port()), "--timeout", "400"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "with HE keys" in run.stdout
    (he_run,) = [p / "workspace" for p in (tmp_path / "results").iterdir()]

    # what reached the server's aggregator: every tensor of every update was ciphertext
    updates = json.loads((he_run / UPDATE_SIZES_FILE).read_text())["updates"]
    assert {(u["round"], u["site"]) for u in updates} == {(r, s) for r in range(ROUNDS) for s in SITES}
    assert all(u["encrypted"] == u["tensors"] > 0 and u["in_clear"] == 0 for u in updates), updates
    # what the server kept: its global model's trained tensors are ciphertext, the frozen ones the start's
    saved = torch.load(he_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    start = torch.load(initial, weights_only=True)
    encrypted = set(encrypted_tensors(saved))
    assert len(encrypted) == updates[0]["tensors"]
    assert all(torch.equal(torch.as_tensor(saved[k]), start[k]) for k in saved if k not in encrypted)

    # plain FedAvg on the same sites, start, rounds and seeds
    (tmp_path / "plain").mkdir()
    plain_job = tiny_job(tmp_path / "plain", **settings)
    plain_run, _ = simulate(plain_job, tmp_path / "plain" / "workspace", tmp_path / "data", initial)
    plain = torch.load(plain_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]

    context = poc / "example_project" / "prod_00" / "site1" / "startup" / "client_context.tenseal"
    decrypted = torch.load(
        decrypt_main(
            [
                str(he_run / "app_server" / "FL_global_model.pt"),
                "--context",
                str(context),
                "--preset",
                "tiny",
                "--out",
                str(tmp_path / "he_model.pt"),
            ]
        ),
        weights_only=True,
    )
    moved = max(float((torch.as_tensor(plain[k]).float() - start[k].float()).abs().max()) for k in encrypted)
    off = max(float((decrypted[k].float() - torch.as_tensor(plain[k]).float()).abs().max()) for k in encrypted)
    assert moved > 1e-3 and off < moved / 100, (moved, off)  # the same training, up to CKKS's rounding

    he_scores = json.loads((he_run / "cross_site_val" / "cross_val_results.json").read_text())
    plain_scores = json.loads((plain_run / "cross_site_val" / "cross_val_results.json").read_text())
    for site in SITES:  # each site decrypted the server's final model and scored it
        he_final, plain_final = he_scores[site]["SRV_FL_global_model.pt"], plain_scores[site]["SRV_FL_global_model.pt"]
        assert abs(he_final["val_accuracy"] - plain_final["val_accuracy"]) <= 0.01, (site, he_final, plain_final)
        assert abs(he_final["val_loss"] - plain_final["val_loss"]) < 1e-3, (site, he_final, plain_final)
        assert not any(name.startswith(site) for name in he_scores[site])  # no local model reached the server
