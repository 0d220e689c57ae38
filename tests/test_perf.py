"""Threads on shared machines, the CPU loader path and the GPU run book's CPU smoke mode (issue 21)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from volcontrast.utils.threads import available_cpus, cgroup_cpu_limit, default_threads, worker_init

# ------------------------------------------------------------------------------------------- thread counts


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_own_cgroup(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "0::/slurm/job7\n")
    _write(root / "slurm" / "job7" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    _write(root / "slurm" / "job7" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) is None
    _write(root / "cpu.max", "300000 100000\n")  # the container's root limit still applies
    assert cgroup_cpu_limit(root, proc) == 3.0


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "7:memory:/x\n4:cpu,cpuacct:/docker/abc\n")
    d = root / "cpu,cpuacct" / "docker" / "abc"
    _write(d / "cpu.cfs_quota_us", "250000\n")
    _write(d / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root, proc) == 2.5
    _write(d / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "missing") is None


def test_available_cpus_is_affinity_capped_by_quota_rounded_up():
    assert available_cpus(affinity=8, quota=2.5) == 3
    assert available_cpus(affinity=8, quota=None) == 8
    assert available_cpus(affinity=2, quota=16.0) == 2
    assert available_cpus(affinity=4, quota=0.3) == 1
    assert available_cpus(affinity=4, quota=2.0) == 2


def test_default_threads_honours_omp_num_threads():
    assert default_threads({"OMP_NUM_THREADS": "3"}, affinity=8, quota=None) == 3
    assert default_threads({"OMP_NUM_THREADS": "4,2"}, affinity=8, quota=None) == 4  # nested list: outer level
    for bad in ("", "0", "abc", "-2"):
        assert default_threads({"OMP_NUM_THREADS": bad}, affinity=5, quota=2.2) == 3
    assert default_threads({}, affinity=5, quota=None) == 5


def _show(args, env_over, preexec=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_over)
    proc = subprocess.run([sys.executable, "-m", "volcontrast", *args, "bench", "threads", "--show"], env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_run_uses_one_thread_with_omp_num_threads_1():
    info = _show([], {"OMP_NUM_THREADS": "1"})
    assert info["torch_threads"] == 1
    assert info["omp_wait_policy"] == "PASSIVE"  # set by the command line before torch starts


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_run_uses_one_thread_with_a_one_cpu_affinity():
    cpu = min(os.sched_getaffinity(0))
    info = _show([], {}, preexec=lambda: os.sched_setaffinity(0, {cpu}))
    assert info["affinity_cpus"] == 1
    assert info["available_cpus"] == 1
    assert info["torch_threads"] == 1


def test_threads_option_sets_torch_threads_and_user_wait_policy_is_kept():
    info = _show(["--threads", "1"], {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"})
    assert info["torch_threads"] == 1
    assert info["omp_num_threads"] == "1"  # exported for processes started later
    assert info["omp_wait_policy"] == "ACTIVE"


class _ThreadsDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "0"))])


def test_worker_init_gives_each_loader_worker_one_thread():
    loader = torch.utils.data.DataLoader(_ThreadsDataset(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
    for threads, env in loader:
        assert int(threads) == 1
        assert int(env) == 1


# --------------------------------------------------------------------------------------------- loader path


def test_cut_box_into_a_batch_row_pads_only_outside():
    from volcontrast.views.sampler import cut_box

    vol = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    out = np.full((2, 4, 4, 4), 123.0, dtype=np.float32)
    cut_box(vol, np.array([1, 1, 2]), (4, 4, 4), -1.0, out=out)  # fully inside: an exact slice
    np.testing.assert_array_equal(out, vol[:, 1:5, 1:5, 2:6])
    cut_box(vol, np.array([-1, 3, 5]), (4, 4, 4), -1.0, out=out)  # leaves the volume: padded there
    expected = np.full((2, 4, 4, 4), -1.0, dtype=np.float32)
    expected[:, 1:4, 0:3, 0:2] = vol[:, 0:3, 3:6, 5:7]
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="expected"):
        cut_box(vol, np.array([0, 0, 0]), (4, 4, 4), 0.0, out=np.empty((2, 3, 4, 4), np.float32))


def test_loader_worker_batches_equal_in_process_batches(synth_cache):
    from volcontrast.data.cache import Cache
    from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig

    _, cache = synth_cache
    cfg = BoxSamplerConfig(crop_size=(16, 16, 16), box_size=(20, 20, 20), volumes_per_batch=2, crops_per_volume=2)
    sampler = BoxSampler(cache, Cache(cache).ids, cfg, seed=3, steps=2)
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, sampler=range(2), num_workers=1,
                                         worker_init_fn=worker_init)
    for step, batch in enumerate(loader):
        direct = sampler[step]
        assert isinstance(direct["boxes"], np.ndarray)
        assert batch["boxes"].is_shared()  # filled in shared memory by the worker: no copy on the way
        np.testing.assert_array_equal(batch["boxes"].numpy(), direct["boxes"])
        np.testing.assert_array_equal(batch["box_lower"].numpy(), direct["box_lower"])


def test_bench_loader_reports_consistent_numbers(synth_cache):
    from volcontrast.bench.loader import H100_VIEWS_PER_S, run_loader_benchmark
    from volcontrast.views.sampler import box_size_for

    _, cache = synth_cache
    r = run_loader_benchmark(cache=str(cache), crop=16, workers=(0, 1), steps=2, warmup=1, volumes_per_batch=2,
                             crops_per_volume=3, progress=False)
    box = box_size_for((16, 16, 16), 1.4)
    assert r["box"] == list(box)
    assert [row["workers"] for row in r["rows"]] == [0, 1]
    for row in r["rows"]:
        assert row["crops"] == 2 * 2 * 3
        assert row["crop_bytes"] == r["channels"] * box[0] * box[1] * box[2] * 4
        assert row["bytes"] == row["crops"] * row["crop_bytes"]
        assert row["crops_per_s"] == pytest.approx(row["crops"] / row["seconds"])
        assert row["views_per_s"] == pytest.approx(2 * row["crops_per_s"])
        assert row["mb_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e6)
        assert row["feeds_h100"] == (row["views_per_s"] >= H100_VIEWS_PER_S)
    assert r["ceiling_crops_per_s"] == max(row["crops_per_s"] for row in r["rows"])


# ---------------------------------------------------------------------------------------------- run book


def test_gpu_runbook_smoke_has_every_method_and_the_table(tmp_path, capsys):
    from volcontrast.bench.gpu import registered_methods
    from volcontrast.cli import main

    out = tmp_path / "runbook"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "gpu", "--smoke", "--out", str(out), "--steps", "1"])  # generates its own small cohort
    assert exc.value.code == 0
    result = json.loads((out / "gpu_runbook.json").read_text())
    table = (out / "gpu_runbook.md").read_text()
    methods = registered_methods()
    assert {"pcl", "simclr"} <= set(methods)
    assert [m["method"] for m in result["methods"]][:2] == ["pcl", "simclr"]
    assert sorted(m["method"] for m in result["methods"]) == sorted(methods)
    for m in result["methods"]:
        assert "error" not in m and "skipped" not in m, m
        assert m["step_s"] > 0 and m["samples_per_s"] == pytest.approx(m["views_per_step"] / m["step_s"], rel=0.5)
        assert m["ratio_vs_dynunet"] == pytest.approx(m["samples_per_s"] / result["references"]["dynunet"]
                                                      ["samples_per_s"])
        assert 0 <= m["data_wait"] <= 1 and m["mfu"] > 0
        assert f"| {m['method']} |" in table
    assert [c["check"] for c in result["checks"]] == ["bf16 autocast", "torch.compile", "fused AdamW",
                                                      "GPU-side augmentation"]
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert set(result["references"]) == {"dynunet", "plain_unet"}
    assert [v["variant"] for v in result["finetune_overhead"]] == ["base", "pdcr", "uafs"]
    assert result["finetune_overhead"][0]["overhead"] == 0.0
    assert "| bare DynUNet (reference) |" in table and "| pdcr |" in table and "| uafs |" in table
    assert "# GPU run book (smoke, CPU)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_runbook_without_a_gpu_is_one_line_exit_2(tmp_path, capsys):
    from volcontrast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "gpu", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device: no CUDA GPU here; `volcontrast bench gpu --smoke` runs the CPU check"]
