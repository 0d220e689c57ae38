"""The method registry and its contract: every registered method runs 3 CPU steps with a finite loss, resumes
exactly, and leaves weights that ``finetune --init`` loads. A new method is tested by registering it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from volcontrast.config import to_dict
from volcontrast.data.cache import Cache
from volcontrast.engine.config import pretrain_presets, resolve_pretrain_config
from volcontrast.engine.finetune import build_segmentation_backbone, resolve_finetune_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.run import read_log
from volcontrast.errors import InputError
from volcontrast.methods import registry
from volcontrast.methods.base import PretrainMethod
from volcontrast.methods.registry import config_sections, get_method, list_methods, register_method

from helpers import pretrain_interrupted

BUILTIN = ["simclr", "gcl", "pcl", "spade", "spade-nodebias", "alice", "voco", "mae"]


def _small(name: str, **kw):
    base = {"method": name, "steps": 3, "log_every": 1, "checkpoint_every": 2, "probe_crops": 0,
            "data": {"crop_size": [16, 16, 16], "workers": 0}}
    return resolve_pretrain_config("cpu-tiny", {**base, **get_method(name).small}, kw)


@pytest.fixture(scope="module")
def cache(synth_cache):
    return synth_cache[1]


def test_every_builtin_method_is_registered_in_order():
    assert list_methods()[: len(BUILTIN)] == BUILTIN
    assert {"contrast", "spade", "alice", "voco", "mae"} <= set(config_sections())
    assert {"pcl-paper", "alice-paper", "cpu-tiny", "gpu-3d"} <= set(pretrain_presets())


def test_unknown_method_is_an_input_error_listing_the_registered_ones():
    with pytest.raises(InputError) as exc:
        resolve_pretrain_config(None, {"method": "nope"})
    assert str(exc.value) == f"--method: unknown method 'nope'; choose one of {', '.join(list_methods())}"


def test_sections_round_trip_through_yaml_dicts_and_keep_their_shape():
    cfg = resolve_pretrain_config("alice-paper")
    data = to_dict(cfg)
    assert data["alice"]["global_stages"] == 1 and data["spade"]["provider"] == "body"
    assert data["voco"]["grid"] == [2, 2, 1] and data["mae"]["mask_ratio"] == 0.75
    again = resolve_pretrain_config(None, data)
    assert again == cfg and to_dict(again) == data
    assert again != resolve_pretrain_config(None, {**data, "mae": {"mask_ratio": 0.6}})
    with pytest.raises(InputError, match=r"config\.mae: unknown key\(s\) \['nope'\]"):
        resolve_pretrain_config(None, {"mae": {"nope": 1}})


def test_registering_a_clashing_name_or_section_fails_but_a_repeat_is_a_no_op():
    spec = get_method("pcl")
    assert register_method("pcl", spec.cls, section="contrast").cls is spec.cls
    with pytest.raises(ValueError, match="already registered"):
        register_method("pcl", type("Other", (PretrainMethod,), {}))

    @dataclasses.dataclass
    class OtherSection:
        x: int = 0

    with pytest.raises(ValueError, match="config section 'mae' is already registered"):
        registry.register_section("mae", OtherSection)


def test_engine_and_methods_do_not_import_each_other_the_wrong_way():
    """engine/ names no method; methods never import the engine at run time (annotations only)."""
    from pathlib import Path

    import volcontrast

    root = Path(volcontrast.__file__).parent
    for path in (root / "engine").glob("*.py"):
        # the one allowed mention: the default value of --method
        text = path.read_text(encoding="utf-8").replace('method: str = "pcl"  # the default --method', "")
        for name in BUILTIN:
            for pattern in (f'"{name}"', f"'{name}'", f"methods.{name.replace('-', '_')} "):
                assert pattern not in text, (path.name, pattern)
    for path in (root / "methods").glob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.startswith(("from volcontrast.engine", "import volcontrast.engine")):
                raise AssertionError(f"{path.name}:{i + 1} imports the engine at run time")


@pytest.mark.parametrize("name", list_methods())
def test_method_contract_three_steps_exact_resume_and_finetune_loads(name, cache, tmp_path):
    cfg = _small(name)
    result = pretrain(cache, tmp_path / "full", cfg, progress=False)
    rows = read_log(tmp_path / "full" / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "collapse_warning" in rows[0] and rows[-1]["loss"] == pytest.approx(result.last_loss, rel=1e-5)
    # exact resume: stop at step 3's log (checkpoint at 2), resume, compare with the uninterrupted run
    pretrain_interrupted(cache, tmp_path / "cut", _small(name), at_step=3)
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["step"] == 2
    pretrain(cache, tmp_path / "cut", resume=True, progress=False)
    cut = read_log(tmp_path / "cut" / "log.csv")
    assert [r["step"] for r in cut] == [1, 2, 3]
    for a, b in zip(rows, cut):
        assert a["loss"] == b["loss"], (name, a["step"])
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    # the weights load into a segmentation network (finetune --init RUN)
    ft = resolve_finetune_config(None, None, {"init": str(tmp_path / "full"), "data": {"crop_size": [16, 16, 16]}})
    net, note = build_segmentation_backbone(Cache(cache), ft)
    enc = {k[len("backbone."):]: v for k, v in wa.items() if k.startswith("backbone.encoder.")}
    state = net.state_dict()
    assert enc and all(torch.equal(state[k], v) for k, v in enc.items())
    assert f"{name} run" in note


@pytest.mark.parametrize(("name", "extra"), [("voco", {}), ("mae", {"mae": {"sparse": True}})])
def test_new_methods_run_on_the_residual_encoder_unet(name, extra, cache, tmp_path):
    cfg = _small(name, steps=2, model={"backbone": "resenc_unet", "preset": "tiny"}, **extra)
    result = pretrain(cache, tmp_path / "run", cfg, progress=False)
    assert len(result.history) == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["architecture"]["name"] == "resenc_unet"


@pytest.mark.slow
def test_mae_under_torchrun_two_cpu_ranks(cache, tmp_path):
    from helpers import torchrun_pretrain

    proc = torchrun_pretrain(cache, tmp_path / "run", "--preset", "cpu-tiny", "--method", "mae", "--crop", "16",
                             "--crop", "16", "--crop", "16", "--steps", "3", "--config", str(_yaml(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["masked_fraction"] == 0.75 for r in rows)


def _yaml(tmp_path):
    import yaml

    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump({**get_method("mae").small, "log_every": 1}))
    return path
