"""Export to nnU-Net v2 / MONAI and import of their checkpoints (``volcontrast export``, ``finetune --init``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from volcontrast.cli import main
from volcontrast.engine.export import export_monai, export_nnunet, load_run_backbone
from volcontrast.engine.interop import build_from_external
from volcontrast.engine.run import save_checkpoint
from volcontrast.errors import InputError
from volcontrast.io import save_volume
from volcontrast.nets import backbone_from_nnunet_plans, build_backbone
from volcontrast.nets.unet import to_nnunet_state_dict

from helpers import phantom

ARCH_KWARGS = {
    "n_stages": 4, "features_per_stage": [8, 16, 32, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def _plans(features=None) -> dict:
    kwargs = copy.deepcopy(ARCH_KWARGS)
    if features:
        kwargs["features_per_stage"] = features
    arch = {"network_class_name": PLAIN, "arch_kwargs": kwargs, "_kw_requires_import": REQUIRES_IMPORT}
    return {"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"data_identifier": "x", "patch_size": [16, 32, 32], "architecture": arch}}}


def _cli(args) -> int:
    """Run the command line; its exit code (0 on success)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return int(info.value.code or 0)


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _pretrain_run(folder: Path, net: nn.Module) -> Path:
    """A pretraining run folder as `volcontrast pretrain` writes it (backbone under ``backbone.``)."""
    wrapper = nn.Module()
    wrapper.backbone = net
    wrapper.head = nn.Linear(4, 4)  # method heads are saved too and must be ignored
    save_checkpoint(folder, wrapper, {"kind": "pretrain", "method": "pcl", "dim": net.dim,
                                      "architecture": net.arch_config(), "backbone_prefix": "backbone."}, None)
    return folder


CT = {"settings": {}, "spacing": [2.0, 2.0, 3.0], "modality": "ct",
      "ct_stats": {"clip_low": -1000.0, "clip_high": 250.0, "mean": 50.0, "std": 300.0}}


def _segmentation_run(folder: Path, net: nn.Module, patch) -> Path:
    save_checkpoint(folder, net, {"kind": "segmentation", "dim": net.dim, "architecture": net.arch_config(),
                                  "patch_size": list(patch), "preprocessing": CT,
                                  "label_names": {"0": "background", "1": "organ1", "2": "organ2"}}, None)
    return folder


@pytest.fixture
def plans_run(tmp_path):
    plans = _write(tmp_path / "nnUNetPlans.json", _plans())
    torch.manual_seed(0)
    net = backbone_from_nnunet_plans(plans, in_channels=1, num_classes=2)
    return plans, _pretrain_run(tmp_path / "run", net), net


# ------------------------------------------------------------------------------------------------ nnU-Net


def test_nnunet_export_loads_with_nnunets_own_code(plans_run, tmp_path):
    nnunetv2 = pytest.importorskip("nnunetv2")
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans, run, net = plans_run
    out = tmp_path / "pretrained.pth"
    assert _cli(["export", run, "--to", "nnunet", "--plans", plans, "--out", out]) == 0
    saved = torch.load(out, weights_only=True)
    assert list(saved) == ["network_weights"]
    weights = saved["network_weights"]
    assert all(v.device.type == "cpu" for v in weights.values())
    arch = _plans()["configurations"]["3d_fullres"]["architecture"]
    upstream = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      1, 5, deep_supervision=True)  # the target dataset's 5 classes
    load_pretrained_weights(upstream, str(out))
    state = upstream.state_dict()
    non_seg = [k for k in state if ".seg_layers." not in k]
    assert sorted(weights) == sorted(non_seg)  # every non-seg key, the aliased decoder.encoder.* ones included
    assert any(k.startswith("decoder.encoder.") for k in weights) and any(".all_modules." in k for k in weights)
    ours = to_nnunet_state_dict(net)
    for key in non_seg:
        assert torch.equal(state[key], ours[key]), key
    assert nnunetv2 is not None


def _nnunet_preprocessed(root: Path, plans: dict) -> Path:
    """The files ``nnUNetv2_train`` reads from ``nnUNet_preprocessed/DatasetXXX``: plans, dataset.json and a data
    folder (one placeholder file: only its ending is looked at before training starts)."""
    folder = root / "Dataset999_Tiny"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "case0.npz").write_bytes(b"")
    plans = {**plans, "dataset_name": "Dataset999_Tiny", "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "original_median_spacing_after_transp": [3.0, 2.0, 2.0],
             "original_median_shape_after_transp": [16, 32, 32], "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": {
                 "max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                 "percentile_99_5": 1.0, "std": 1.0}}}
    resampling = "resample_data_or_seg_to_shape"
    plans["configurations"]["3d_fullres"].update({
        "preprocessor_name": "DefaultPreprocessor", "batch_size": 2, "spacing": [3.0, 2.0, 2.0],
        "median_image_size_in_voxels": [16, 32, 32], "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
        "resampling_fn_probabilities": resampling, "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
        "resampling_fn_probabilities_kwargs": {}, "batch_dice": False})
    _write(folder / "nnUNetPlans.json", plans)
    _write(folder / "dataset.json", {"channel_names": {"0": "CT"}, "numTraining": 2, "file_ending": ".nii.gz",
                                     "labels": {"background": 0, "organ1": 1, "organ2": 2}})
    return folder


def test_nnunet_trainer_takes_the_export_as_pretrained_weights(plans_run, tmp_path, monkeypatch):
    """What ``nnUNetv2_train Dataset999_Tiny 3d_fullres 0 -tr nnUNetTrainer_1epoch -pretrained_weights FILE`` does
    before its first epoch: build nnU-Net's trainer (deep supervision on) from the preprocessed plans, then
    ``run_training.maybe_load_checkpoint`` with the file. (The trainer class is imported directly: nnU-Net's
    search through every trainer module imports timm/torchvision, which this CPU venv need not have working.)"""
    pytest.importorskip("nnunetv2")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch

    _, run, net = plans_run
    folder = _nnunet_preprocessed(tmp_path / "nnUNet_preprocessed", _plans())
    out = export_nnunet(run, folder / "nnUNetPlans.json", tmp_path / "pretrained.pth")
    two_channels = _write(tmp_path / "dataset.json", {"channel_names": {"0": "CT", "1": "PET"}})
    _write(tmp_path / "nnUNetPlans.json", _plans())
    with pytest.raises(InputError) as info:  # the dataset.json beside the plans is checked too
        export_nnunet(run, tmp_path / "nnUNetPlans.json", tmp_path / "x.pth")
    assert info.value.line() == (f"{two_channels}: the dataset has 2 input channel(s) (CT, PET) but the run's network "
                                 "takes 1; nnU-Net would refuse its first convolution")
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # as run_training.get_trainer_from_args sets it
    trainer = nnUNetTrainer_1epoch(plans=plans, configuration="3d_fullres", fold=0, device=torch.device("cpu"),
                                   dataset_json=json.loads((folder / "dataset.json").read_text()))
    maybe_load_checkpoint(trainer, False, False, str(out))
    assert trainer.enable_deep_supervision
    state = trainer.network.state_dict()
    ours = to_nnunet_state_dict(net)
    non_seg = [k for k in state if ".seg_layers." not in k]
    assert len(non_seg) == len(torch.load(out, weights_only=True)["network_weights"])
    for key in non_seg:
        assert torch.equal(state[key], ours[key]), key
    # ... and back: the checkpoint nnU-Net's trainer writes initialises `finetune --init` with the same encoder
    from volcontrast.engine.finetune import FinetuneConfig, build_segmentation_backbone

    trainer.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    got, note = build_segmentation_backbone(SimpleNamespace(num_classes=4, channels=1),
                                            FinetuneConfig(init=str(tmp_path / "checkpoint_final.pth")))
    assert note.startswith("nnU-Net v2 checkpoint")
    for key, value in _encoder(net).items():
        assert torch.equal(got.state_dict()[key], value), key


def test_nnunet_export_mismatch_names_first_key_and_both_shapes(plans_run, tmp_path, capsys):
    _, run, _ = plans_run
    bad = _write(tmp_path / "other.json", _plans(features=[8, 16, 32, 64]))
    with pytest.raises(InputError) as info:
        export_nnunet(run, bad, tmp_path / "x.pth")
    assert info.value.where == str(bad)
    assert info.value.problem == (
        f"configuration '3d_fullres' does not match run {run}: first mismatching key "
        "encoder.stages.3.0.convs.0.conv.weight: run (32, 32, 3, 3, 3), plans (64, 32, 3, 3, 3)")
    assert not (tmp_path / "x.pth").exists()
    assert _cli(["export", run, "--to", "nnunet", "--plans", bad, "--out", tmp_path / "x.pth"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {bad}: {info.value.problem}"]


def test_nnunet_export_needs_plans_and_a_cnn(tmp_path, capsys):
    torch.manual_seed(0)
    swin = build_backbone("swin_unetr", dim=2, preset="tiny", num_classes=2)
    run = _pretrain_run(tmp_path / "swin", swin)
    plans = _write(tmp_path / "p.json", _plans())
    with pytest.raises(InputError, match="nnU-Net builds plain_unet/resenc_unet networks; .* is a swin_unetr"):
        export_nnunet(run, plans, tmp_path / "x.pth")
    assert _cli(["export", run, "--to", "nnunet", "--out", tmp_path / "x.pth"]) == 2
    assert capsys.readouterr().err.strip() == "error: --plans: --to nnunet needs the nnU-Net plans file (--plans)"


# -------------------------------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize(("name", "dim", "preset", "patch"), [
    ("plain_unet", 3, "tiny", (16, 16, 16)), ("swin_unetr", 2, "tiny", (64, 64))])
def test_monai_bundle_round_trip_same_logits(tmp_path, name, dim, preset, patch):
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    net = build_backbone(name, dim=dim, preset=preset, in_channels=1, num_classes=3).eval()
    run = _segmentation_run(tmp_path / "run", net, patch)
    bundle = export_monai(run, tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    assert type(network).__name__ == ("PlainConvUNet" if name == "plain_unet" else "SwinUNETR")
    parser.get_parsed_content("load_weights")
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        torch.testing.assert_close(network(x), net(x), atol=1e-5, rtol=0)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "organ1", "2": "organ2"}


def test_monai_bundle_runs_on_a_scan_with_monai_bundle_run(tmp_path):
    import monai.bundle
    import nibabel as nib

    torch.manual_seed(0)
    net = build_backbone("plain_unet", dim=3, preset="tiny", in_channels=1, num_classes=3).eval()
    run = _segmentation_run(tmp_path / "run", net, (16, 16, 16))
    assert _cli(["export", run, "--to", "monai", "--out", tmp_path / "bundle"]) == 0
    image, _, affine = phantom(shape=(20, 18, 16), spacing=(2.0, 2.0, 3.0))
    (tmp_path / "scans").mkdir()
    save_volume(tmp_path / "scans" / "case0.nii.gz", image, affine)
    bundle = tmp_path / "bundle"
    monai.bundle.run(run_id="run", init_id="initialize", meta_file=str(bundle / "configs" / "metadata.json"),
                     config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
                     dataset_dir=str(tmp_path / "scans"), output_dir=str(tmp_path / "out"))
    assert torch.is_grad_enabled()  # the bundle runs under no_grad without switching autograd off for good
    seg = nib.load(str(tmp_path / "out" / "case0_seg.nii.gz"))
    assert seg.shape == image.shape  # the scan's own grid (same spacing: nothing resampled)
    np.testing.assert_allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}


def _two_channel_cache(tmp_path: Path):
    """A prepared CT + PET (z-scored) dataset, as in test_prepare_data.test_modality_per_channel."""
    from volcontrast.data.cache import open_cache
    from volcontrast.data.prepare import prepare_dataset

    from helpers import write_nnunet

    root = write_nnunet(tmp_path / "raw", n=2, orientations=("RAS",))
    for i in range(2):
        _, lab, aff = phantom(seed=i)
        pet = (1.0 + lab * 2.0 + np.random.default_rng(i).random(lab.shape)).astype(np.float32)
        save_volume(root / "imagesTr" / f"case{i:02d}_0001.nii.gz", pet, aff)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(meta))
    prepare_dataset(root, tmp_path / "cache", workers=1, progress=False)
    return root, open_cache(tmp_path / "cache")


def test_monai_bundle_normalises_each_channel_as_prepare(tmp_path):
    import monai.bundle
    import nibabel as nib
    from monai.bundle import ConfigParser

    root, cache = _two_channel_cache(tmp_path)
    resolved = cache.manifest["resolved"]
    assert resolved["channel_modalities"] == ["ct", "mr"]
    torch.manual_seed(0)
    net = build_backbone("plain_unet", dim=3, preset="tiny", in_channels=2, num_classes=3).eval()
    run = tmp_path / "run"
    save_checkpoint(run, net, {"kind": "segmentation", "dim": 3, "architecture": net.arch_config(),
                               "patch_size": [16, 16, 16], "preprocessing": resolved}, None)
    bundle = export_monai(run, tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["dataset_dir"] = str(root / "imagesTr")
    cases = parser.get_parsed_content("datalist")
    assert [[Path(f).name for f in files] for files in cases] == [
        [f"case{i:02d}_{c:04d}.nii.gz" for c in range(2)] for i in range(2)]
    out = parser.get_parsed_content("preprocessing")({"image": cases[0]})["image"]
    assert tuple(out.shape) == (2, 20, 18, 16)  # same spacing: nothing resampled, and the bundle does not crop
    cid = cache.ids[0]
    lower = cache.meta(cid).crop_offset
    cached = np.asarray(cache.image(cid))
    window = tuple(slice(lo, lo + n) for lo, n in zip(lower, cached.shape[1:]))
    got = out.numpy()
    assert got[(slice(None), *window)].shape == cached.shape
    for c in range(2):  # channel 0: the CT window of channel 0; channel 1: z-scored over the case's body
        np.testing.assert_allclose(got[c][window], cached[c], rtol=0, atol=1e-5, err_msg=f"channel {c}")
    ct = resolved["channel_ct_stats"][0]
    raw = nib.load(str(cases[0][0])).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(got[0], (np.clip(raw, ct["clip_low"], ct["clip_high"]) - ct["mean"]) / ct["std"],
                               rtol=0, atol=1e-5)  # outside the body box too
    # ... and the whole bundle runs on the two-channel scans, one segmentation per case in the scan's grid
    monai.bundle.run(run_id="run", init_id="initialize", meta_file=str(bundle / "configs" / "metadata.json"),
                     config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
                     dataset_dir=str(root / "imagesTr"), output_dir=str(tmp_path / "seg"))
    segs = sorted(p.name for p in (tmp_path / "seg").iterdir())
    assert segs == ["case00_0000_seg.nii.gz", "case01_0000_seg.nii.gz"]
    seg = nib.load(str(tmp_path / "seg" / segs[0]))
    assert seg.shape == (20, 18, 16)
    np.testing.assert_allclose(seg.affine, nib.load(str(cases[0][0])).affine)


def test_single_channel_bundle_keeps_one_window():
    from volcontrast.engine.export import monai_inference_config

    net = build_backbone("plain_unet", dim=3, preset="tiny", in_channels=1, num_classes=2)
    config = monai_inference_config(net, {"preprocessing": CT})
    (intensity,) = [t for t in config["preprocessing"]["transforms"] if "Intensity" in t["_target_"]]
    assert intensity == {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000.0, "a_max": 250.0,
                         "b_min": -3.5, "b_max": 2.0 / 3.0, "clip": True}
    assert "channel_normalisation" not in config and config["datalist"].endswith("'*.nii*'))))")


# ------------------------------------------------------------------------------------------------ imports


def _encoder(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if k.startswith("encoder.")}


def _nnunet_checkpoint(path: Path, net: nn.Module, plans: dict) -> Path:
    """What nnU-Net v2 writes as checkpoint_final.pth (its training log holds numpy floats)."""
    torch.save({"network_weights": to_nnunet_state_dict(net), "optimizer_state": {},
                "grad_scaler_state": None, "logging": {"mean_fg_dice": [np.float64(0.5)],
                                                        "ema_fg_dice": [np.float64(0.4)]},
                "_best_ema": np.float64(0.4), "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": {"channel_names": {"0": "CT"}}, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)
    return path


def test_finetune_init_from_nnunet_checkpoint_and_exported_file(plans_run, tmp_path):
    from volcontrast.engine.finetune import FinetuneConfig, build_segmentation_backbone

    plans, run, net = plans_run
    ckpt = _nnunet_checkpoint(tmp_path / "checkpoint_final.pth", net, _plans())
    cache = SimpleNamespace(num_classes=4, channels=1)
    torch.manual_seed(1)
    got, note = build_segmentation_backbone(cache, FinetuneConfig(init=str(ckpt)))
    assert got.num_classes == 4 and got.encoder_channels == [8, 16, 32, 32]
    assert note.startswith(f"nnU-Net v2 checkpoint {ckpt} (")
    for key, value in _encoder(net).items():
        assert torch.equal(got.state_dict()[key], value), key
    assert not torch.equal(got.decoder.stages[0].convs[0].conv.weight, net.decoder.stages[0].convs[0].conv.weight)
    got_all, _ = build_segmentation_backbone(cache, FinetuneConfig(init=str(ckpt), load="all"))
    for key, value in net.decoder.state_dict().items():
        assert torch.equal(got_all.decoder.state_dict()[key], value), key

    # export -> finetune --init FILE.pth: the architecture comes from the config's model.plans
    exported = export_nnunet(run, plans, tmp_path / "exported.pth")
    config = FinetuneConfig(init=str(exported))
    config.model.plans = str(plans)
    got2, note2 = build_segmentation_backbone(cache, config)
    assert "architecture from the config's model" in note2
    for key, value in _encoder(net).items():
        assert torch.equal(got2.state_dict()[key], value), key
    config.model.plans = ""  # the default tiny U-Net does not fit: the loader lists the offending keys
    with pytest.raises(InputError, match="encoder weights do not match this architecture") as info:
        build_segmentation_backbone(cache, config)
    assert info.value.where == str(exported)


def test_finetune_init_from_nnssl_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = backbone_from_nnunet_plans(_write(tmp_path / "p.json", _plans()), in_channels=1, num_classes=2)
    arch = {"arch_class_name": "PlainConvUNet", "arch_kwargs": copy.deepcopy(ARCH_KWARGS),
            "arch_kwargs_requiring_import": REQUIRES_IMPORT}
    path = tmp_path / "nnssl.pth"
    torch.save({"network_weights": to_nnunet_state_dict(net), "nnssl_adaptation_plan": {
        "architecture_plans": arch, "pretrain_num_input_channels": 1, "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem"}}, path)
    got, note = build_from_external(path, None, dim=3, in_channels=1, num_classes=3, deep_supervision=False)
    assert note.startswith("nnssl checkpoint")
    for key, value in _encoder(net).items():
        assert torch.equal(got.state_dict()[key], value), key


@pytest.mark.parametrize(("name", "dim"), [("plain_unet", 3), ("swin_unetr", 2)])
def test_finetune_init_from_monai_bundle(tmp_path, name, dim):
    from volcontrast.engine.finetune import FinetuneConfig, build_segmentation_backbone

    torch.manual_seed(0)
    net = build_backbone(name, dim=dim, preset="tiny", in_channels=1, num_classes=3)
    bundle = export_monai(_segmentation_run(tmp_path / "run", net, (64,) * dim), tmp_path / "bundle")
    config = FinetuneConfig(init=str(bundle), dim=dim, load="all")
    got, note = build_segmentation_backbone(SimpleNamespace(num_classes=2, channels=1), config.validate())
    assert note.startswith(f"MONAI bundle {bundle} (") and got.name == name and got.num_classes == 2
    for key, value in {**_encoder(net), **{k: v for k, v in net.state_dict().items()
                                           if k.startswith("decoder.")}}.items():
        assert torch.equal(got.state_dict()[key], value), key


def test_bundle_expressions_are_not_evaluated(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("plain_unet", dim=3, preset="tiny", in_channels=1, num_classes=3)
    bundle = export_monai(_segmentation_run(tmp_path / "run", net, (16, 16, 16)), tmp_path / "bundle")
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["network_def"]["nonlin"] = "$__import__('os').system('true')"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="network_def.nonlin is an expression") as info:
        build_from_external(bundle, None, dim=3, in_channels=1, num_classes=2, deep_supervision=False)
    assert info.value.where == str(config_path)


def test_load_run_backbone_of_a_pretraining_run(plans_run):
    _, run, net = plans_run
    got, meta = load_run_backbone(run)
    assert meta["kind"] == "pretrain"
    for key, value in net.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


# --------------------------------------------------------------------------------- scans smaller than the patch


def test_case_smaller_than_the_patch_is_padded_trains_and_predicts(tmp_path):
    import nibabel as nib

    from volcontrast.data.cache import Cache
    from volcontrast.data.prepare import prepare_dataset
    from volcontrast.engine.finetune import finetune, resolve_finetune_config
    from volcontrast.engine.predict import predict_scans
    from volcontrast.views.label_sampler import LabelledBoxSampler, LabelSamplerConfig

    from helpers import write_nnunet

    raw = write_nnunet(tmp_path / "raw", n=3, shape=(12, 10, 8))
    prepare_dataset(raw, tmp_path / "cache", workers=1, progress=False)
    cache = Cache(tmp_path / "cache")
    cid = cache.ids[0]
    shape = cache.image(cid).shape[1:]
    assert all(s < 16 for s in shape)
    crop, box = (16, 16, 16), (20, 20, 20)
    sampler = LabelledBoxSampler(cache.root, [cid], LabelSamplerConfig(crop_size=crop, box_size=box, batch_size=2,
                                                                       foreground_prob=0.5), seed=0, steps=8)
    label = np.asarray(cache.label(cid))
    for step in range(8):
        batch = sampler[step]
        assert batch["boxes"].shape == (2, 1, *box)
        for labels, lower in zip(batch["label_boxes"], batch["box_lower"]):
            inner = labels[2:18, 2:18, 2:18]  # the crop inside the box's context margin
            assert np.bincount(inner.ravel(), minlength=3)[1:].tolist() == np.bincount(
                label.ravel(), minlength=3)[1:].tolist()  # the whole case is inside the crop, padded around it
            assert all(-(16 - s) - 2 <= lo <= -2 for lo, s in zip(lower, shape))
    cfg = resolve_finetune_config("cpu-tiny", None, {"data": {"crop_size": list(crop)}, "steps": 2})
    finetune(cache, tmp_path / "run", cfg, progress=False)
    scan = raw / "imagesTr" / "case01_0000.nii.gz"
    (out,) = predict_scans(tmp_path / "run", [scan], tmp_path / "pred", progress=False)
    got, src = nib.load(str(out)), nib.load(str(scan))
    assert got.shape == src.shape == (12, 10, 8)
    np.testing.assert_array_equal(got.affine, src.affine)


def test_pretrain_plans_flag_builds_exactly_the_plans_network(phantom_cache, tmp_path):
    plans = _write(tmp_path / "nnUNetPlans.json", _plans())
    run = tmp_path / "run"
    assert _cli(["pretrain", phantom_cache, "--plans", plans, "--preset", "cpu-tiny", "--steps", "1",
                 "--crop", "16", "--crop", "16", "--crop", "16", "--workers", "0", "--out", run, "--quiet"]) == 0
    expected = backbone_from_nnunet_plans(plans, in_channels=1, num_classes=2).arch_config()
    assert json.loads((run / "model.json").read_text())["architecture"] == expected
    export_nnunet(run, plans, tmp_path / "w.pth")  # and it exports against the same plans


def test_pretrain_plans_without_crop_takes_the_plans_patch_size(phantom_cache, tmp_path, capsys):
    import yaml

    data = _plans()
    data["configurations"]["3d_fullres"]["patch_size"] = [12, 16, 16]  # total stride (4, 8, 8); cases ~(22, 20, 19)
    plans = _write(tmp_path / "nnUNetPlans.json", data)
    run = tmp_path / "run"
    assert _cli(["pretrain", phantom_cache, "--plans", plans, "--preset", "cpu-tiny", "--steps", "1",
                 "--workers", "0", "--out", run, "--quiet"]) == 0  # cpu-tiny's own crop is 24^3
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["crop_size"] == [12, 16, 16]
    assert f"crop 12 x 16 x 16: patch_size of 3d_fullres in {plans}" in capsys.readouterr().err
    # a crop given in the YAML (or with --crop) wins over the plans
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  crop_size: [16, 16, 16]\n")
    for args in (["--config", config], ["--crop", 16, "--crop", 16, "--crop", 16]):
        out = tmp_path / f"run{len(args)}"
        assert _cli(["pretrain", phantom_cache, "--plans", plans, "--preset", "cpu-tiny", "--steps", "1", *args,
                     "--workers", "0", "--out", out, "--quiet"]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["data"]["crop_size"] == [16, 16, 16]
        assert "patch_size of" not in capsys.readouterr().err
