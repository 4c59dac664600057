"""Training loop, freeze policies, checkpoints and the expert/transfer CLIs on tiny generated sites."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedxvit.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.datalist import write_site
from fedxvit.errors import FedXViTError
from fedxvit.model import build_model
from fedxvit.training import (
    apply_freeze_policy,
    balanced_accuracy,
    evaluate,
    make_optimizer,
    make_scheduler,
    shared_state_keys,
    train_epoch,
    weight_diff,
)
from tooling import expert, transfer

CPU = torch.device("cpu")


def write_square_site(root, class_names, per_class, seed=0, size=40):
    """Noise images; class c > 0 has a bright square in quadrant c-1 (class 0: no square)."""
    rng = np.random.default_rng(seed)
    corners = [(2, 2), (2, size // 2 + 2), (size // 2 + 2, 2), (size // 2 + 2, size // 2 + 2)]
    entries = {}
    for split, count in per_class.items():
        entries[split] = []
        (root / split).mkdir(parents=True, exist_ok=True)
        for label in range(len(class_names)):
            for i in range(count):
                pixels = (rng.random((size, size + 6)) * 70).astype(np.uint8)
                if label:
                    r, c = corners[(label - 1) % 4]
                    pixels[r : r + size // 3, c : c + size // 3] = 230
                rel = f"{split}/{label}_{i}.png"
                Image.fromarray(pixels).save(root / rel)
                entries[split].append({"image": rel, "label": label})
    return write_site(root, entries, class_names, {"generator": "tests", "seed": seed})


def random_batches(n_batches=3, batch=4, size=32, classes=2):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(batch, 1, size, size, generator=g),
            "label": torch.randint(0, classes, (batch,), generator=g),
        }
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize("policy", ["head", "last-k", "full", "full-but-batchnorm"])
def test_freeze_policy_holds_through_adamw_steps_with_weight_decay(policy):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2)
    trainable = apply_freeze_policy(model, policy, last_k=1)
    held = {  # the BatchNorm layers' weights and biases, the model's own class token and position embeddings
        f"{layer}.{name}" if layer else name
        for layer, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or not layer
        for name, _ in module.named_parameters(recurse=False)
    }
    assert {"cls_token", "pos_embed", "backbone.bn1.weight"} <= held
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.5)
    stats = train_epoch(model, random_batches(), optimizer, CPU)
    assert stats["steps"] == 3
    after = model.state_dict()
    expected = {
        "head": lambda n: n.startswith("head."),
        "last-k": lambda n: n.startswith(("blocks.0.", "norm.", "head.")),  # tiny has one block: it is the last
        "full": lambda n: True,
        "full-but-batchnorm": lambda n: n not in held,
    }[policy]
    params = dict(model.named_parameters())
    assert sorted(trainable) == sorted(n for n in params if expected(n))
    for name, tensor in after.items():
        if name in trainable:
            assert not torch.equal(tensor, before[name]), f"{name} should have trained"
        elif name in params or policy != "full":  # frozen weights AND (when the CNN is frozen) BN buffers
            assert torch.equal(tensor, before[name]), f"{name} changed although frozen"
    bn_buffers = [k for k in after if k.endswith(("running_mean", "num_batches_tracked"))]
    changed_bn = [k for k in bn_buffers if not torch.equal(after[k], before[k])]
    assert bool(changed_bn) == (policy == "full")


@pytest.mark.parametrize("policy", ["head", "last-k", "full", "full-but-batchnorm"])
def test_shared_state_carries_bn_statistics_only_where_bn_trains(policy):
    model = build_model("tiny", num_classes=2)
    trainable = apply_freeze_policy(model, policy, last_k=1)
    shared = shared_state_keys(model, trainable)
    assert shared[: len(trainable)] == trainable
    stats = [k for k in shared if k.endswith(("running_mean", "running_var"))]
    bn_layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if policy == "full":
        assert sorted(stats) == sorted(f"{n}.{b}" for n in bn_layers for b in ("running_mean", "running_var"))
    else:
        assert stats == []
    assert not any(k.endswith("num_batches_tracked") for k in shared)
    assert set(shared) <= set(model.state_dict())


def test_last_k_counts_blocks_from_the_end_and_rejects_out_of_range():
    model = build_model("cpu", num_classes=2)
    names = apply_freeze_policy(model, "last-k", last_k=1)
    assert any(n.startswith("blocks.1.") for n in names) and not any(n.startswith("blocks.0.") for n in names)
    with pytest.raises(FedXViTError, match="last_k=5"):
        apply_freeze_policy(model, "last-k", last_k=5)
    with pytest.raises(FedXViTError, match="unknown freeze policy"):
        apply_freeze_policy(model, "backbone")


def test_should_abort_stops_between_batches():
    model = build_model("tiny", num_classes=2)
    optimizer = make_optimizer(model, lr=1e-3)
    calls = []

    def abort_after_two():
        calls.append(1)
        return len(calls) > 2

    stats = train_epoch(model, random_batches(n_batches=5), optimizer, CPU, should_abort=abort_after_two)
    assert stats["steps"] == 2 and stats["images"] == 8 and stats["aborted"]


def test_evaluate_stops_between_batches_and_scores_what_it_saw():
    model = build_model("tiny", num_classes=2)
    batches = random_batches(n_batches=5)
    reads = []

    def abort_after_two():
        reads.append(1)
        return len(reads) > 2

    partial = evaluate(model, batches, CPU, should_abort=abort_after_two)
    first_two = evaluate(model, batches[:2], CPU)
    assert partial["aborted"] and not first_two["aborted"] and len(reads) == 3
    assert partial["count"] == 8 and partial["labels"] == first_two["labels"]
    assert partial["loss"] == pytest.approx(first_two["loss"]) and partial["accuracy"] == first_two["accuracy"]
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    evaluate(model, batches[:1], CPU)
    assert grad_enabled == [False]  # scoring builds no autograd graph


def test_scheduler_warms_up_then_decays():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_steps=3)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.1


def test_training_learns_a_separable_square_vs_none_problem(tmp_path):
    write_square_site(tmp_path, list(TASK_CLASSES), {"training": 32, "validation": 16, "testing": 0})
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2)
    train = make_loader(tmp_path, "training", 32, 8, train=True, seed=0)
    val = make_loader(tmp_path, "validation", 32, 32, train=False)
    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.01)
    epochs = 8
    scheduler = make_scheduler(optimizer, epochs * len(train), warmup_steps=4)
    for _ in range(epochs):
        train_epoch(model, train, optimizer, CPU, scheduler=scheduler)
    result = evaluate(model, val, CPU)
    assert result["count"] == 32 and len(result["probs"]) == 32 and len(result["probs"][0]) == 2
    assert result["accuracy"] >= 0.95, result


def test_weight_diff_is_new_minus_old():
    old = {"a": torch.ones(2), "n": torch.tensor(3)}
    new = {"a": torch.tensor([3.0, 1.0]), "n": torch.tensor(4)}
    diff = weight_diff(new, old)
    assert list(diff) == ["a"] and torch.equal(diff["a"], torch.tensor([2.0, 0.0]))


def test_checkpoint_round_trip_and_sidecar(tmp_path):
    model = build_model("tiny", num_classes=2)
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, model, {"class_names": list(TASK_CLASSES), "data_hash": "abc", "metrics": {"val_accuracy": 0.5}}
    )
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["preset"] == "tiny" and meta["num_classes"] == 2 and meta["class_names"] == ["Healthy", "Tumor"]
    assert meta["image_size"] == 32 and meta["data_hash"] == "abc"
    rebuilt, meta2 = build_model_from_checkpoint(path)
    assert meta2 == meta
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_channels_last_model_is_saved_contiguous_with_the_same_values(tmp_path):
    """The expert trains channels-last (tooling.expert); its checkpoint holds the one layout every reader expects."""
    model = build_model("tiny", num_classes=2).to(memory_format=torch.channels_last)
    assert any(not v.is_contiguous() for v in model.state_dict().values())  # the case is real: 4-D convolutions
    save_checkpoint(tmp_path / "m.pt", model, {"class_names": list(TASK_CLASSES)})
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(v.is_contiguous() for v in state.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_mismatched_or_missing_checkpoint_is_one_clear_line(tmp_path):
    path = tmp_path / "expert.pt"
    save_checkpoint(path, build_model("tiny", num_classes=4), {"class_names": list(EXPERT_CLASSES)})
    with pytest.raises(FedXViTError) as wrong_preset:
        load_checkpoint(path, preset="cpu", num_classes=2)
    assert str(wrong_preset.value) == (
        f"{path} was saved for preset 'tiny' with 4 classes, but preset 'cpu' with 2 classes was asked for"
    )
    with pytest.raises(FedXViTError, match="'tiny' with 4 classes, but preset 'tiny' with 2 classes"):
        build_model_from_checkpoint(path, num_classes=2)
    with pytest.raises(FedXViTError, match=r"checkpoint .*absent\.pt does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "bare.pt").write_bytes(path.read_bytes())
    with pytest.raises(FedXViTError, match="has no sidecar"):
        load_checkpoint(tmp_path / "bare.pt")


def test_expert_then_transfer_cli_end_to_end(tmp_path, capsys):
    public = tmp_path / "public"
    write_square_site(public, list(EXPERT_CLASSES), {"training": 4, "validation": 2, "testing": 2})
    out = tmp_path / "models"
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = [
        "--data",
        str(public),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--tracking-uri",
        uri,
    ]
    report = expert.main(args)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "meningioma" in printed and "f1-score" in printed
    saved = json.loads((out / "expert_report.json").read_text())
    assert saved["test_count"] == 8
    best, _ = build_model_from_checkpoint(out / "expert.pt")  # the report scores the best checkpoint on the test split
    test = evaluate(best, make_loader(public, "testing", 32, 8, train=False), CPU)
    assert (saved["test_accuracy"], saved["test_loss"]) == (test["accuracy"], pytest.approx(test["loss"]))
    assert set(EXPERT_CLASSES) <= set(saved["per_class"]) and saved == json.loads(json.dumps(report))
    meta = json.loads((out / "expert.pt.json").read_text())
    assert meta["class_names"] == list(EXPERT_CLASSES) and meta["preset"] == "tiny" and meta["num_classes"] == 4
    assert meta["data_hash"] == json.loads((public / "dataset.json").read_text())["data_hash"]
    assert list((out / "tb" / "expert").glob("events.out.tfevents.*"))

    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("fedxvit-expert").experiment_id]
    )
    assert len(runs) == 1 and runs[0].data.params["preset"] == "tiny" and "val_accuracy" in runs[0].data.metrics

    expert.main(args)
    assert "reusing" in capsys.readouterr().out

    initial = tmp_path / "models" / "initial_global.pt"
    result = transfer.main(["--expert", str(out / "expert.pt"), "--out", str(initial)])
    printed = capsys.readouterr().out
    assert "transplanted:" in printed and "head.weight" in printed
    assert sorted(result["not_copied"]) == ["head.bias", "head.weight"]
    model, meta = build_model_from_checkpoint(initial, preset="tiny", num_classes=2)
    assert meta["class_names"] == list(TASK_CLASSES) and meta["transplanted_from"]["checkpoint"] == str(
        out / "expert.pt"
    )
    expert_state = torch.load(out / "expert.pt", weights_only=True)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], expert_state["blocks.0.attn.qkv.weight"])


def test_expert_cli_reports_a_missing_data_folder_in_one_line(tmp_path):
    with pytest.raises(FedXViTError, match="no dataset.json"):
        expert.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"), "--no-mlflow"])


def test_max_grad_norm_bounds_every_step():
    def distance_moved(max_grad_norm):
        torch.manual_seed(0)
        model = build_model("tiny", num_classes=2)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is the (clipped) gradient
        stats = train_epoch(model, random_batches(n_batches=2), optimizer, CPU, max_grad_norm=max_grad_norm)
        assert stats["steps"] == 2
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())

    unclipped = distance_moved(None)
    assert unclipped > 0.01, "the bound below must be one the gradient really exceeds"
    assert 0 < distance_moved(1e-3) <= 2 * 1e-3 + 1e-7  # two steps of at most 1e-3 each


def test_balanced_accuracy_is_sklearns_mean_recall_over_the_present_classes():
    from sklearn.metrics import balanced_accuracy_score

    labels, predicted = [1] * 9 + [0], [1] * 10  # a 90% Tumor site, a model that calls everything Tumor
    assert balanced_accuracy(labels, predicted) == 0.5 == balanced_accuracy_score(labels, predicted)
    labels, predicted = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    assert balanced_accuracy(labels, predicted) == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert balanced_accuracy([], []) == 0.0
