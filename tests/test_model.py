"""Model presets, shapes, offline pretrained loading, Grad-CAM layer and transfer surgery."""

import pytest
import timm
import torch

from fedxvit.errors import FedXViTError
from fedxvit.model import PRESETS, build_model, get_preset
from tooling.transfer import transplant


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_small_presets_give_one_logit_row_per_image(preset, batch):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4).eval()
    size = PRESETS[preset].image_size
    with torch.no_grad():
        logits = model(torch.rand(batch, 1, size, size))
    assert logits.shape == (batch, 4)
    assert torch.isfinite(logits).all()
    assert model.pos_embed.shape[1] == 1 + (size // 16) ** 2


def test_anchor_is_effnetv2s_plus_vit_base_and_runs_native_and_smaller_inputs():
    model = build_model("anchor", num_classes=2).eval()
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 12
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 768)
    assert 85_000_000 < model.param_count < 110_000_000
    with torch.no_grad():
        assert model(torch.rand(1, 1, 224, 224)).shape == (1, 2)
        # position embeddings are resampled for other grids, so a smaller input still works
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(FedXViTError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")


def test_cam_layer_is_the_stride16_cnn_stage_and_backbone_stops_there():
    model = build_model("tiny", num_classes=2).eval()
    seen = {}
    model.cam_layer.register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64))
    assert seen["shape"][-2:] == (4, 4)
    assert model.cam_layer is model.backbone.blocks[-1]
    # the unused stride-32 stage is gone: every parameter gets a gradient
    model.train()
    model(torch.rand(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_pretrained_is_refused_for_shrunk_presets_without_downloading():
    with pytest.raises(FedXViTError, match="no pretrained weights"):
        build_model("cpu", num_classes=4, pretrained="timm")


def test_local_rgb_backbone_weights_load_offline_with_stem_adapted(tmp_path):
    preset = PRESETS["tiny"]
    torch.manual_seed(1)
    source = timm.create_model(
        preset.backbone,
        in_chans=3,
        num_classes=10,
        channel_multiplier=preset.channel_multiplier,
        depth_multiplier=preset.depth_multiplier,
    )
    path = tmp_path / "effnet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("tiny", num_classes=2, pretrained=str(path))
    loaded, original = model.backbone.state_dict(), source.state_dict()
    assert loaded["conv_stem.weight"].shape[1] == 1
    assert torch.allclose(loaded["conv_stem.weight"], original["conv_stem.weight"].sum(1, keepdim=True))
    for name, tensor in loaded.items():
        if name != "conv_stem.weight":
            assert torch.equal(tensor, original[name]), name


def test_local_weights_of_another_shape_or_missing_file_fail_in_one_line(tmp_path):
    with pytest.raises(FedXViTError, match="does not exist"):
        build_model("tiny", pretrained=str(tmp_path / "nope.pth"))
    torch.save(build_model("cpu").backbone.state_dict(), tmp_path / "cpu.pth")
    with pytest.raises(FedXViTError, match="do not fit"):
        build_model("tiny", pretrained=str(tmp_path / "cpu.pth"))


def test_frozen_batchnorm_stays_in_eval_after_model_train():
    model = build_model("tiny", num_classes=2)
    for p in model.backbone.parameters():
        p.requires_grad = False
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.blocks.training


def test_transplant_copies_every_non_head_tensor_exactly_and_reinitializes_the_head():
    torch.manual_seed(0)
    expert = build_model("tiny", num_classes=4)
    with torch.no_grad():  # make BN statistics distinctive so a missed buffer would show
        for m in expert.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
        expert.head.weight.fill_(3.0)
    expert_state = expert.state_dict()
    torch.manual_seed(123)
    target = build_model("tiny", num_classes=2)
    report = transplant(expert_state, target)
    target_state = target.state_dict()
    non_head = [k for k in expert_state if not k.startswith("head.")]
    assert sorted(report["copied"]) == sorted(non_head)
    assert sorted(report["not_copied"]) == ["head.bias", "head.weight"]
    assert report["shape_mismatch"] == ["head.weight", "head.bias"]
    for name in non_head:
        assert torch.equal(target_state[name], expert_state[name]), name
    assert target_state["head.weight"].shape == (2, PRESETS["tiny"].embed_dim)
    assert not (target_state["head.weight"] == 3.0).any()
    assert report["copied_parameters"] + report["fresh_parameters"] == target.param_count
