"""Backbones by name, uniform feature access, weight transfer, nnU-Net plans, heads."""

from __future__ import annotations

import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file, save_file
from torch import nn

from volcontrast.errors import InputError
from volcontrast.nets import (
    BACKBONE_NAMES,
    DenseProjectionHead,
    GlobalProjectionHead,
    ProjectionHead,
    ReconstructionHead,
    backbone_from_nnunet_plans,
    build_backbone,
    count_parameters,
    deduplicated_state_dict,
    list_presets,
    load_backbone_state,
    load_encoder_state,
    to_monai_state_dict,
    to_nnunet_state_dict,
)
from volcontrast.nets.unet import resolve_op

torch.set_num_threads(2)

# smallest cheap input per (backbone, dim) that trains (bottleneck > 1 voxel)
SHAPES = {
    ("plain_unet", 2): (32, 32), ("plain_unet", 3): (16, 16, 16),
    ("resenc_unet", 2): (32, 32), ("resenc_unet", 3): (16, 16, 16),
    ("swin_unetr", 2): (64, 64), ("swin_unetr", 3): (64, 32, 32),
}
CASES = sorted(SHAPES)


def _input(name: str, dim: int, batch: int = 2, channels: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, channels, *SHAPES[(name, dim)])


def _build(name: str, dim: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, dim=dim, preset="tiny", **kw)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_tiny_shapes_match_declared_channels_and_strides(name, dim):
    model = _build(name, dim, in_channels=2, num_classes=3).eval()
    x = _input(name, dim, channels=2)
    spatial = torch.tensor(x.shape[2:])
    with torch.no_grad():
        skips = model.encode(x)
        feats = model.decode(skips)
        logits = model.segment(feats)
    assert len(skips) == len(model.encoder_channels) == len(model.encoder_strides)
    for f, c, s in zip(skips, model.encoder_channels, model.encoder_strides):
        assert f.shape == (2, c, *(spatial // torch.tensor(s)).tolist())
    assert len(feats) == len(model.decoder_channels) == len(model.encoder_channels) - 1
    for f, c, s in zip(feats, model.decoder_channels, model.decoder_strides):
        assert f.shape == (2, c, *(spatial // torch.tensor(s)).tolist())
    assert model.decoder_strides[-1] == (1,) * dim
    assert logits.shape == (2, 3, *x.shape[2:])
    assert len(model.min_input_multiple) == dim


@pytest.mark.parametrize(("name", "dim"), [("plain_unet", 3), ("swin_unetr", 2)])
def test_deep_supervision_returns_full_resolution_first_and_same_weights(name, dim):
    plain = _build(name, dim)
    deep = _build(name, dim, deep_supervision=True)
    deep.load_state_dict(plain.state_dict(), strict=True)  # DS does not change the weights
    x = _input(name, dim)
    with torch.no_grad():
        outs = deep.eval()(x)
        ref = plain.eval()(x)
    sizes = [tuple(torch.tensor(x.shape[2:]) // torch.tensor(s)) for s in deep.decoder_strides[::-1]]
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(int(v) for v in s) for s in sizes]
    torch.testing.assert_close(outs[0], ref)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_arch_config_round_trip_rebuilds_identical_model(name):
    model = _build(name, 2, num_classes=4).eval()
    config = json.loads(json.dumps(model.arch_config()))  # JSON-serialisable
    assert config["name"] == name and config["num_classes"] == 4
    rebuilt = build_backbone(**config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _input(name, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.arch_config() == config


def test_overrides_change_fields_and_survive_round_trip():
    model = build_backbone("plain_unet", dim=3, features_per_stage=[4, 8, 16, 24], norm="batch", n_conv_per_stage=2)
    assert model.encoder_channels == [4, 8, 16, 24]
    cfg = model.arch_config()
    assert cfg["norm_op"] == "torch.nn.BatchNorm3d" and cfg["n_conv_per_stage"] == [2, 2, 2, 2]
    build_backbone(**cfg).load_state_dict(model.state_dict(), strict=True)
    swin = build_backbone("swin_unetr", dim=3, feature_size=24)
    assert swin.encoder_channels == [24, 24, 48, 96, 192, 384]


def test_bad_names_presets_and_overrides_are_clear_input_errors():
    with pytest.raises(InputError, match="unknown backbone 'unet'"):
        build_backbone("unet")
    with pytest.raises(InputError, match="unknown preset 'huge'"):
        build_backbone("plain_unet", preset="huge")
    with pytest.raises(InputError, match="for \\(3,\\)-D inputs, not 2-D"):
        build_backbone("plain_unet", dim=2, preset="nnunet-3d")
    with pytest.raises(InputError, match="features_per_stage has 5 entries"):
        build_backbone("plain_unet", n_stages=4, features_per_stage=[8, 16, 32, 64, 128])
    with pytest.raises(InputError, match="'torch.nn.Foo' is not allowed"):
        build_backbone("plain_unet", nonlin="torch.nn.Foo")
    with pytest.raises(InputError, match="unknown argument"):
        build_backbone("swin_unetr", features_per_stage=[1])
    assert {p.backbone for p in list_presets()} == set(BACKBONE_NAMES)


def test_input_size_errors_are_clear():
    model = _build("plain_unet", 3)
    with pytest.raises(ValueError, match="multiple of \\(8, 8, 8\\)"):
        model(torch.randn(1, 1, 16, 16, 12))
    swin = _build("swin_unetr", 3).train()
    with pytest.raises(ValueError, match="1-voxel bottleneck"):
        swin(torch.randn(1, 1, 32, 32, 32))


def test_input_size_check_lists_every_constraint_once():
    model = build_backbone("plain_unet", dim=3, preset="tiny", num_classes=2).train()
    with pytest.raises(ValueError) as info:
        model.check_input_size((12, 8, 4))
    assert str(info.value) == (
        "plain_unet: input spatial shape (12, 8, 4) does not fit the network (each axis a multiple of (8, 8, 8)): "
        "axis 0: 12 is not a multiple of the total stride 8 (use 8 or 16); "
        "axis 2: 4 is not a multiple of the total stride 8 (use 8); "
        "the bottleneck (down-sampling (8, 8, 8)) would be 1 voxel, which instance norm cannot train on "
        "(1-voxel bottleneck): make at least one axis 16 or larger")
    # anisotropic strides (thick slices): each axis only needs its own total stride
    aniso = build_backbone("plain_unet", dim=3, preset="tiny", num_classes=2, strides=[1, [2, 2, 1], 2, [2, 2, 1]])
    assert aniso.min_input_multiple == (8, 8, 2)
    assert aniso.input_size_problems((16, 16, 6)) == []
    assert aniso.input_size_problems((16, 16, 5)) == ["axis 2: 5 is not a multiple of the total stride 2 (use 4 or 6)"]
    assert model.input_size_problems((8, 8)) == ["needs 3 spatial axes, got 2"]


@pytest.mark.parametrize("name", ["plain_unet", "resenc_unet", "swin_unetr"])
def test_encoder_only_transfer_across_num_classes(name):
    source = _build(name, 2, num_classes=5)
    torch.manual_seed(1)
    target = build_backbone(name, dim=2, preset="tiny", num_classes=3)
    decoder_before = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("encoder.")}
    report = load_encoder_state(target, source.state_dict())
    assert report.ok and not (report.missing or report.unexpected or report.mismatched)
    assert len(report.loaded) == sum(k.startswith("encoder.") for k in target.state_dict())
    assert report.ignored == sum(not k.startswith("encoder.") for k in source.state_dict())
    for key, value in target.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(value, source.state_dict()[key]), key
        else:
            assert torch.equal(value, decoder_before[key]), key


def test_encoder_transfer_from_deduplicated_safetensors_and_prefixed_keys(tmp_path):
    source = _build("plain_unet", 3)
    path = tmp_path / "model.safetensors"
    save_file(deduplicated_state_dict(source), str(path))  # plain save_file refuses aliased DNA tensors
    wrapped = {"backbone." + k: v for k, v in load_file(str(path)).items()}
    wrapped["projection.0.weight"] = torch.zeros(3, 3)
    target = build_backbone("plain_unet", dim=3, num_classes=7)
    report = load_encoder_state(target, {"module." + k: v for k, v in wrapped.items()}, source_prefix="backbone.")
    assert report.ok and report.ignored > 0
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(source.eval().encode(x), target.eval().encode(x)):
            torch.testing.assert_close(a, b)
    full = build_backbone("plain_unet", dim=3)
    assert load_backbone_state(full, load_file(str(path))) == []


def test_mismatched_architecture_reports_offending_keys():
    source = _build("plain_unet", 3)
    target = build_backbone("plain_unet", dim=3, features_per_stage=[8, 16, 32, 48])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape-mismatched .*encoder\.stages\.3\.0\.convs\.0\.conv\.weight"):
        load_encoder_state(target, source.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # untouched on error
    report = load_encoder_state(target, source.state_dict(), strict=False)
    assert not report.ok and report.loaded
    assert {k for k, _, _ in report.mismatched} >= {"encoder.stages.3.0.convs.0.conv.weight"}
    deeper = build_backbone("plain_unet", dim=3, n_stages=5, features_per_stage=[8, 16, 32, 64, 64],
                            strides=[1, 2, 2, 2, 2], n_conv_per_stage=1, n_conv_per_stage_decoder=1)
    report = load_encoder_state(deeper, source.state_dict(), strict=False)
    assert any(k.startswith("encoder.stages.4.") for k in report.missing)
    with pytest.raises(ValueError, match="no encoder weights match"):
        load_encoder_state(target, _build("swin_unetr", 3).state_dict())


def test_post_decoder_blocks_are_applied_and_old_checkpoints_still_load():
    model = _build("plain_unet", 2).eval()
    old_state = model.state_dict()
    x = _input("plain_unet", 2)
    with torch.no_grad():
        ref = model.decode(model.encode(x))
    blocks = [nn.Conv2d(c, c, 1) for c in model.decoder_channels]
    for b in blocks:
        nn.init.dirac_(b.weight)
        nn.init.constant_(b.bias, 1.0)  # each stage output gets +1, which the next stage sees
    model.set_post_decoder_blocks(blocks)
    with torch.no_grad():
        out = model.decode(model.encode(x))
    torch.testing.assert_close(out[0], ref[0] + 1)
    assert not torch.allclose(out[1], ref[1] + 1)  # stage 1 consumed the modified stage 0
    new_keys = [k for k in model.state_dict() if k not in old_state]
    assert new_keys and all(k.startswith("post_decoder_blocks.") for k in new_keys)
    assert sorted(load_backbone_state(model, old_state)) == sorted(new_keys)
    with pytest.raises(ValueError, match="one post-decoder block per decoder stage"):
        model.set_post_decoder_blocks([nn.Identity()])


def test_nnunet_3d_preset_size_and_channels():
    model = build_backbone("plain_unet", dim=3, preset="nnunet-3d", num_classes=3).eval()
    assert model.encoder_channels == [32, 64, 128, 256, 320, 320]
    assert model.decoder_channels == [320, 256, 128, 64, 32]
    assert model.min_input_multiple == (32, 32, 32)
    assert 29e6 < count_parameters(model) < 33e6  # nnU-Net 3d_fullres PlainConvUNet: ~31 M
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 64)).shape == (1, 3, 32, 32, 64)


def _new_format_plans() -> dict:
    kwargs = {
        "n_stages": 4, "features_per_stage": [8, 16, 32, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"data_identifier": "x", "patch_size": [16, 32, 32], "architecture": arch},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        "2d_old": {"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 8, "unet_max_num_features": 16,
                   "n_conv_per_stage_encoder": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
                   "conv_kernel_sizes": [[3, 3]] * 3, "pool_op_kernel_sizes": [[1, 1], [2, 2], [2, 2]]},
    }}


def test_nnunet_plans_round_trip_matches_upstream_network(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    plans = _new_format_plans()
    path.write_text(json.dumps(plans))
    torch.manual_seed(0)
    model = backbone_from_nnunet_plans(path, "3d_cascade_fullres", in_channels=2, num_classes=3).eval()
    assert model.encoder_channels == [8, 16, 32, 32]
    assert model.encoder_strides == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)]
    assert model.min_input_multiple == (4, 8, 8)
    build_backbone(**model.arch_config()).load_state_dict(model.state_dict(), strict=True)
    # our decoder loop == nnU-Net's own network with the exported weights
    kw = dict(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        kw[key] = resolve_op(kw[key])
    upstream = PlainConvUNet(input_channels=2, num_classes=3, **kw).eval()
    upstream.load_state_dict(to_nnunet_state_dict(model), strict=True)
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), upstream(x))
    old = backbone_from_nnunet_plans(path, "2d_old", in_channels=1, num_classes=2)
    assert old.dim == 2 and old.encoder_channels == [8, 16, 16]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("nonlin", "os.system", "'os.system' is not allowed"),
    ("network_class_name", "my.module.EvilUNet", "network class 'my.module.EvilUNet' is not supported"),
    ("conv_op", "torch.nn.Linear", "'torch.nn.Linear' is not allowed"),
])
def test_nnunet_plans_reject_unknown_class_strings(tmp_path, field, value, message):
    plans = _new_format_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    (arch if field == "network_class_name" else arch["arch_kwargs"])[field] = value
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    with pytest.raises(InputError, match=message) as info:
        backbone_from_nnunet_plans(path, in_channels=1, num_classes=2)
    assert info.value.where == str(path)
    with pytest.raises(InputError, match="configuration '3d_lowres' not found"):
        backbone_from_nnunet_plans(path, "3d_lowres", in_channels=1, num_classes=2)


def test_swin_regrouping_equals_monai_swinunetr():
    model = _build("swin_unetr", 2, num_classes=3).eval()
    cfg = model.arch_config()
    kwargs = {k: v for k, v in cfg.items()
              if k not in ("name", "dim", "in_channels", "num_classes", "preset", "deep_supervision")}
    monai_net = SwinUNETR(in_channels=1, out_channels=3, spatial_dims=2, **kwargs).eval()
    monai_net.load_state_dict(to_monai_state_dict(model), strict=True)
    x = _input("swin_unetr", 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), monai_net(x))


@pytest.mark.parametrize(("name", "dim"), [("plain_unet", 3), ("resenc_unet", 2), ("swin_unetr", 2)])
def test_segmentation_loss_gradients_reach_encoder(name, dim):
    model = _build(name, dim).train()
    logits = model(_input(name, dim))
    nn.functional.cross_entropy(logits, torch.zeros_like(logits[:, 0], dtype=torch.long)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("encoder.")}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    first = next(iter(grads))  # the input convolution / patch embedding
    assert grads[first].abs().sum() > 0, first
    # every encoder part (DNA stage, Swin layer / conv block) gets signal; single tensors may get exactly
    # zero at init (ResEnc zero-initialises the last norm of each residual branch, as nnU-Net does)
    groups: dict[str, float] = {}
    for n, g in grads.items():
        part = ".".join(n.split(".")[:3])
        groups[part] = groups.get(part, 0.0) + float(g.abs().sum())
    assert len(groups) >= 4 and all(v > 0 for v in groups.values()), groups


def test_global_projection_head_equals_manual_pool_and_mlp():
    torch.manual_seed(0)
    head = GlobalProjectionHead(in_channels=16, out_dim=8)
    x = torch.randn(3, 16, 4, 5, 6)
    linear1, linear2 = head.layers[0], head.layers[2]
    assert isinstance(head.layers[1], nn.ReLU) and len(head.layers) == 3
    assert linear1.weight.shape == (16, 16)  # PCL: Linear(C, C) -> ReLU -> Linear(C, out)
    pooled = x.mean(dim=(2, 3, 4))
    manual = torch.relu(pooled @ linear1.weight.T + linear1.bias) @ linear2.weight.T + linear2.bias
    torch.testing.assert_close(head(x), manual)
    torch.testing.assert_close(head(pooled), manual)  # already pooled input
    assert head(torch.randn(3, 16, 7, 7)).shape == (3, 8)  # 2D maps too


def test_dense_and_reconstruction_heads_shapes_and_per_voxel_mlp():
    torch.manual_seed(0)
    dense = DenseProjectionHead(in_channels=8, out_dim=5, hidden_dim=12, dim=3)
    x = torch.randn(2, 8, 3, 4, 5)
    out = dense(x)
    assert out.shape == (2, 5, 3, 4, 5)
    # equals the same MLP applied to each voxel's feature vector
    w1, b1 = dense.layers[0].weight.flatten(1), dense.layers[0].bias
    w2, b2 = dense.layers[2].weight.flatten(1), dense.layers[2].bias
    vec = x.permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(out.permute(0, 2, 3, 4, 1), torch.relu(vec @ w1.T + b1) @ w2.T + b2)
    bn = DenseProjectionHead(in_channels=8, out_dim=4, dim=2, batch_norm=True, num_layers=3).train()
    assert bn(torch.randn(2, 8, 6, 6)).shape == (2, 4, 6, 6)
    assert isinstance(bn.layers[1], nn.BatchNorm2d) and bn.layers[0].bias is None
    assert ReconstructionHead(8, 1, dim=3)(x).shape == (2, 1, 3, 4, 5)
    base = ProjectionHead([(6, 4, True, True), (4, 2, False, False)]).train()
    assert base(torch.randn(5, 6)).shape == (5, 2)
    with pytest.raises(ValueError, match="num_layers"):
        GlobalProjectionHead(8, num_layers=0)
