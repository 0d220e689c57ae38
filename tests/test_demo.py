from __future__ import annotations

from pathlib import Path

from volcontrast.bench.benchmark import parse_method
from volcontrast.bench.demo import DEMO_COHORT, demo_config, user_cache_dir
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.finetune import resolve_finetune_config


def test_demo_config_resolves_and_compares_scratch_simclr_pcl():
    cfg = demo_config()
    assert [parse_method(m, 3)[0] for m in cfg.methods] == ["scratch", "simclr", "pcl"]
    assert parse_method("pcl+uafs+pdcr@2d", 3) == ("pcl", 2, ("pdcr", "uafs"))
    assert cfg.labeled == [1, 2] and cfg.run_folds == [0] and cfg.transductive
    pre = resolve_pretrain_config(cfg.pretrain_preset, None, {**cfg.pretrain, "steps": cfg.pretrain_steps})
    ft = resolve_finetune_config(cfg.finetune_preset, None, {**cfg.finetune, "steps": cfg.finetune_steps})
    assert pre.augment.contrast_prob == 0.0 and tuple(pre.data.crop_size) == (16, 16, 16)
    assert tuple(ft.data.crop_size) == (32, 24, 32)
    assert DEMO_COHORT["fov"] == "chest_abdomen"


def test_user_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VOLCONTRAST_CACHE", str(tmp_path / "c"))
    assert user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VOLCONTRAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache_dir() == tmp_path / "x" / "volcontrast"


def test_demo_says_how_many_scratch_runs_converged():
    from volcontrast.bench.demo import convergence_sentence

    rows = [{"method": "scratch", "labeled": m, "fold": 0, "seed": 0, "at": 1.0, "converged": c}
            for m, c in ((1, 1.0), (2, 0.0))]
    rows += [{"method": "scratch", "labeled": 1, "fold": 0, "seed": 0, "at": 0.3, "converged": 1.0},
             {"method": "pcl", "labeled": 1, "fold": 0, "seed": 0, "at": 1.0, "converged": 1.0}]
    text = convergence_sentence(rows)
    assert "in 1 of 2 runs" in text and "speed, not a better model" in text
    assert "speed" not in convergence_sentence(rows[:1]) and "in 1 of 1 runs" in convergence_sentence(rows[:1])


def test_demo_caveat_points_to_the_converged_study():
    from volcontrast.bench.demo import DEMO_CAVEAT

    assert DEMO_CAVEAT.startswith("Read these verdicts as speed, not as a better model")
    assert "300 steps" in DEMO_CAVEAT and "found no gain" in DEMO_CAVEAT
    results = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert "## The few-label study" in results  # the section the caveat names exists
