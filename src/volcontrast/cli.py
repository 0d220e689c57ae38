"""``volcontrast <verb>``: a thin command line over the library (every verb calls one public function).

Exit codes: 0 success, 2 bad input or usage (one line naming the file and the problem), 1 internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from volcontrast import __version__
from volcontrast.errors import InputError
from volcontrast.utils.threads import set_passive_wait

set_passive_wait()  # before anything imports torch: idle OpenMP threads sleep instead of spinning (shared machines)

app = typer.Typer(
    name="volcontrast",
    help="Contrastive pretraining with spatial priors for 3D CT/MR segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Speed benchmarks: samples/s, data-wait %, peak memory, MFU.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"volcontrast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    threads: int | None = typer.Option(
        None, "--threads", min=1,
        help="torch threads (default: OMP_NUM_THREADS, else the CPUs this process may use: affinity, cgroup quota)."),
) -> None:
    """Contrastive pretraining with spatial priors for 3D CT/MR segmentation."""
    from volcontrast.utils.threads import configure_threads

    configure_threads(threads)


def _echo(msg: str) -> None:
    """A status line on stderr (from the first rank only under torchrun)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        typer.echo(msg, err=True)


# ------------------------------------------------------------------------------------------------ synth


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder for the nnU-Net v2 raw dataset."),
    cases: int = typer.Option(20, "--cases", min=1, help="Number of cases."),
    modality: str = typer.Option("ct", "--modality", help="ct or mr."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed: byte-identical files)."),
    size: tuple[int, int, int] = typer.Option((96, 96, 96), "--size", help="Matrix size X Y Z (voxels)."),
    preview: bool = typer.Option(False, "--preview", help="Also write preview.png (slices with label overlay)."),
    fov: str = typer.Option("varied", "--fov", help="varied, or one body range for every case (e.g. chest_abdomen)."),
) -> None:
    """Write the built-in synthetic torso cohort (nnU-Net v2 raw layout, with landmark files)."""
    from volcontrast.data.synth import generate_cohort

    if modality not in ("ct", "mr"):
        raise InputError("--modality", f"must be ct or mr, got {modality!r}")
    path = generate_cohort(out, cases=cases, modality=modality, seed=seed, size=size, preview=preview, fov=fov)
    _echo(f"wrote {cases} {modality.upper()} cases to {path}")


# ---------------------------------------------------------------------------------------------- prepare


@app.command()
def prepare(
    data: Path = typer.Argument(..., help="MSD or nnU-Net raw folder, a folder of scans, or a .csv/.json list."),
    out: Path = typer.Option(..., "--out", help="Cache folder to write."),
    spacing: tuple[float, float, float] | None = typer.Option(
        None, "--spacing", help="Target spacing X Y Z in mm (default: dataset median)."
    ),
    modality: list[str] | None = typer.Option(
        None, "--modality", help="ct or mr per channel, repeated or comma-separated (default: from dataset.json or "
        "the list's modality column, else detected per case; cases that disagree are an error)."
    ),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Parallel processes (default: up to 4)."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip unreadable or inconsistent cases and list them at the end."
    ),
    cubic: bool = typer.Option(False, "--cubic", help="Cubic instead of linear image interpolation."),
    allow_outside: bool = typer.Option(
        False, "--allow-outside", help="Accept files a dataset.json or list names outside its folder."
    ),
) -> None:
    """Resample, normalise and crop a dataset into the memory-mapped cache (resumable)."""
    from volcontrast.data.prepare import PrepareSettings, format_fingerprint, prepare_dataset

    modalities = ",".join(modality) if modality else None
    settings = PrepareSettings(spacing=spacing, modality=modalities, image_order=3 if cubic else 1)
    report = prepare_dataset(data, out, settings, workers=workers, skip_bad=skip_bad, allow_outside=allow_outside)
    for line in format_fingerprint(report.fingerprint):
        _echo(line)
    _echo(
        f"prepared {len(report.prepared)} case(s), reused {len(report.reused)} unchanged, "
        f"skipped {len(report.skipped)} in {report.seconds:.1f} s -> {out}"
    )
    for cid, line in report.skipped.items():
        _echo(f"skipped {cid}: {line}")


# --------------------------------------------------------------------------------------------- pretrain


def _help_requested() -> bool:
    return any(a in ("--help", "-h") for a in sys.argv[1:])


def _methods_help() -> str:
    """The registered methods, listed only when help is asked for: importing every method (and the networks
    behind them) costs seconds that no other command line should pay."""
    if not _help_requested():
        return "a registered method"
    from volcontrast.methods.registry import list_methods

    return " | ".join(list_methods())


def _presets_help() -> str:
    if not _help_requested():
        return "a pretraining preset"
    from volcontrast.engine.config import pretrain_presets

    return " | ".join(pretrain_presets())


def _dim(value: str | None) -> int | None:
    if value is None:
        return None
    if value.lower() not in ("2d", "3d", "2", "3"):
        raise InputError("--dim", f"must be 2d or 3d, got {value!r}")
    return int(value[0])


@app.command()
def pretrain(
    cache: Path = typer.Argument(..., help="Cache folder written by `volcontrast prepare`."),
    out: Path = typer.Option(..., "--out", help="Run folder to create (or continue with --resume)."),
    method: str | None = typer.Option(None, "--method", help=f"{_methods_help()} (pcl)."),
    dim: str | None = typer.Option(None, "--dim", help="2d (slices, paper parity) or 3d (crops)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimiser steps."),
    preset: str | None = typer.Option(None, "--preset", help=f"{_presets_help()}."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (e.g. a run's config.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: int | None = typer.Option(None, "--seed"),
    backbone: str | None = typer.Option(None, "--backbone", help="plain_unet | resenc_unet | swin_unetr."),
    backbone_preset: str | None = typer.Option(None, "--backbone-preset", help="tiny | small | nnunet-3d | ..."),
    plans: Path | None = typer.Option(None, "--plans", help="nnU-Net v2 plans.json: build exactly its network "
                                      "(configuration: model.plans_configuration, default 3d_fullres)."),
    crop: list[int] | None = typer.Option(None, "--crop", help="Crop size, repeat per axis (--crop 32 --crop 32 ...)."),
    workers: int | None = typer.Option(None, "--workers", min=0, help="Data loader processes."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    provider: str | None = typer.Option(None, "--provider",
                                        help="Correspondence provider of methods that use one: body | affine | index."),
    no_debias: bool = typer.Option(False, "--no-debias", help="spade: no spatial debiasing (the ablation)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Self-supervised pretraining of a backbone on cached volumes with any registered method."""
    import dataclasses

    from volcontrast.config import load_yaml
    from volcontrast.engine.config import resolve_pretrain_config
    from volcontrast.engine.pretrain import pretrain as run_pretrain
    from volcontrast.methods.registry import config_sections

    overrides: dict = {
        "method": method, "dim": _dim(dim), "seed": seed, "device": device,
        "data": {"workers": workers, "crop_size": list(crop) if crop else None},
        "model": {"backbone": backbone, "preset": backbone_preset, "plans": str(plans) if plans else None},
        "spade": {"debias": False if no_debias else None},
    }
    for section, cls in config_sections().items():  # --provider sets every method section that has one
        if any(f.name == "provider" for f in dataclasses.fields(cls)):
            overrides.setdefault(section, {})["provider"] = provider
    cfg = None
    if not resume:
        yaml_data = load_yaml(config) if config else None
        cfg = resolve_pretrain_config(preset, yaml_data, overrides)
        yaml_crop = isinstance(yaml_data, dict) and (yaml_data.get("data") or {}).get("crop_size") is not None
        if cfg.model.plans and not crop and not yaml_crop:  # no crop given: the plans' patch size
            from volcontrast.engine.interop import plans_patch_size

            patch = plans_patch_size(cfg.model.plans, cfg.model.plans_configuration)
            if patch:
                overrides["data"]["crop_size"] = patch
                cfg = resolve_pretrain_config(preset, yaml_data, overrides)
                _echo(f"crop {' x '.join(map(str, patch))}: patch_size of {cfg.model.plans_configuration} in "
                      f"{cfg.model.plans}")
    result = run_pretrain(cache, out, cfg, resume=resume, steps=steps, progress=not quiet)
    _echo(f"pretrained {result.steps} steps in {result.seconds:.1f} s ({result.samples_per_s:.1f} samples/s, "
          f"data wait {100 * result.data_wait:.1f}%), final loss {result.last_loss:.4f} -> {out}")


# --------------------------------------------------------------------------------------------- finetune


@app.command()
def finetune(
    cache: Path = typer.Argument(..., help="Cache folder (labelled cases are split into folds)."),
    out: Path = typer.Option(..., "--out", help="Run folder to create (or continue with --resume)."),
    init: str | None = typer.Option(None, "--init", help="A pretraining run folder, an nnU-Net v2 or nnssl "
                                    "checkpoint file (.pth), a MONAI bundle folder, or 'scratch' (default)."),
    labeled: int | None = typer.Option(None, "--labeled", min=0, help="Labelled training volumes (0 = all)."),
    val: int | None = typer.Option(None, "--val", min=0,
                                   help="Labelled validation volumes for checkpoint choice (default 0: last weights); "
                                        "they count in the label budget."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="Test fold (never trained on)."),
    folds: int | None = typer.Option(None, "--folds", min=2, help="Number of folds (default 3)."),
    steps: int | None = typer.Option(None, "--steps", min=1),
    preset: str | None = typer.Option(None, "--preset", help="cpu-tiny | cpu-small | gpu-3d | pcl-paper."),
    config: Path | None = typer.Option(None, "--config", help="YAML config."),
    load: str | None = typer.Option(None, "--load", help="encoder (default) or all (encoder + decoder)."),
    dim: str | None = typer.Option(None, "--dim", help="2d or 3d (must match the pretraining run)."),
    seed: int | None = typer.Option(None, "--seed"),
    crop: list[int] | None = typer.Option(None, "--crop", help="Patch size, repeat per axis."),
    pdcr: bool = typer.Option(False, "--pdcr", help="Add the PDCR label-affinity patch contrast."),
    pdcr_weight: float | None = typer.Option(None, "--pdcr-weight", help="PDCR weight per layer (0.01)."),
    pdcr_stages: str | None = typer.Option(None, "--pdcr-stages", help="Encoder stages, 0-based (default 2,3)."),
    uafs: bool = typer.Option(False, "--uafs", help="Insert UAFS blocks after each decoder stage."),
    deep_supervision: bool = typer.Option(False, "--deep-supervision", help="Dice+CE on every decoder stage."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (optim.lr)."),
    scratch_lr: float | None = typer.Option(None, "--scratch-lr", help="Learning rate when training from scratch."),
    encoder_lr_scale: float | None = typer.Option(None, "--encoder-lr-scale",
                                                  help="LR factor of a pretrained encoder (0.5)."),
    lr_schedule: str | None = typer.Option(None, "--lr-schedule", help="poly (default) or cosine after the warm-up."),
    freeze_encoder: bool = typer.Option(False, "--freeze-encoder",
                                        help="Frozen-encoder probe: the decoder trains, the encoder never changes."),
    resume: bool = typer.Option(False, "--resume"),
    device: str | None = typer.Option(None, "--device"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Fine-tune a segmentation network with few labels (encoder from a pretraining run or scratch)."""
    from volcontrast.config import load_yaml
    from volcontrast.engine.finetune import finetune as run_finetune
    from volcontrast.engine.finetune import resolve_finetune_config

    overrides = {"init": init, "labeled": labeled, "val": val, "fold": fold, "folds": folds, "load": load,
                 "dim": _dim(dim), "optim": {"lr": lr}, "scratch_lr": scratch_lr,
                 "encoder_lr_scale": encoder_lr_scale, "lr_schedule": lr_schedule,
                 "freeze_encoder": freeze_encoder or None,
                 "seed": seed, "device": device, "data": {"crop_size": list(crop) if crop else None},
                 "pdcr": pdcr or None, "pdcr_weight": pdcr_weight, "uafs": uafs or None,
                 "deep_supervision": deep_supervision or None,
                 "pdcr_stages": _int_list(pdcr_stages, "--pdcr-stages")}
    cfg = None if resume else resolve_finetune_config(preset, load_yaml(config) if config else None, overrides)
    result = run_finetune(cache, out, cfg, resume=resume, steps=steps, progress=not quiet)
    val = result.history[-1].get("val_dice") if result.history else None
    _echo(f"fine-tuned {result.steps} steps in {result.seconds:.1f} s, final loss {result.last_loss:.4f}"
          + (f", validation Dice {val:.3f}" if val is not None else "") + f" -> {out}")


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A fine-tuned run folder."),
    data: Path = typer.Option(..., "--data", help="The cache it was trained on."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="Test fold (default: the run's own)."),
    last: bool = typer.Option(False, "--last", help="Score the last weights instead of the validation choice."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Sliding-window Dice and HD95 per case and class on the test fold -> RUN/metrics.json."""
    from volcontrast.engine.evaluate import evaluate as run_evaluate

    result = run_evaluate(run, data, fold, checkpoint="last" if last else "best", progress=not quiet)
    typer.echo(result["table"])
    _echo(f"mean Dice {result['aggregate']['mean_dice']:.4f} over {result['aggregate']['n_cases']} test cases "
          f"(fold {result['fold']}, {result['checkpoint']} checkpoint) -> {run / 'metrics.json'}")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A fine-tuned run folder."),
    scans: list[Path] = typer.Argument(..., help="Scans to segment (NIfTI, NRRD, MHA, MGZ, DICOM folders)."),
    out: Path = typer.Option(..., "--out", help="Folder for the segmentations."),
    last: bool = typer.Option(False, "--last", help="Use the last weights instead of the validation choice."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Segment scans; each result is written in the scan's own geometry and format."""
    from volcontrast.engine.predict import predict_scans

    source = run / "best" if not last and (run / "best" / "model.safetensors").is_file() else run
    paths = predict_scans(source, scans, out, progress=not quiet)
    _echo(f"wrote {len(paths)} segmentation(s) to {out}")


# ----------------------------------------------------------------------------------------------- export


@app.command()
def export(
    run: Path = typer.Argument(..., help="A pretraining or fine-tuned run folder."),
    to: str = typer.Option(..., "--to", help="nnunet (a -pretrained_weights .pth) or monai (a bundle folder)."),
    out: Path = typer.Option(..., "--out", help="nnunet: the .pth file to write; monai: the bundle folder."),
    plans: Path | None = typer.Option(None, "--plans", help="nnunet: the nnU-Net plans file to match exactly."),
    configuration: str = typer.Option("3d_fullres", "--configuration", help="nnunet: the plans configuration."),
) -> None:
    """Write a run's network for nnU-Net v2 (nnUNetv2_train -pretrained_weights) or as a MONAI bundle."""
    from volcontrast.engine.export import export_monai, export_nnunet

    if to == "nnunet":
        if plans is None:
            raise InputError("--plans", "--to nnunet needs the nnU-Net plans file (--plans)")
        path = export_nnunet(run, plans, out, configuration)
        _echo(f"wrote {path} (nnU-Net v2: nnUNetv2_train DATASET {configuration} FOLD -p "
              f"{plans.stem} -pretrained_weights {path})")
    elif to == "monai":
        path = export_monai(run, out)
        _echo(f"wrote the MONAI bundle {path} (configs/inference.json, configs/metadata.json, models/model.pt)")
    else:
        raise InputError("--to", f"must be nnunet or monai, got {to!r}")


# ------------------------------------------------------------------------------------------- correspond


@app.command()
def correspond(
    cache: Path = typer.Argument(..., help="Cache folder written by `volcontrast prepare`."),
    provider: str = typer.Option("body", "--provider", help="body | affine | index."),
    landmarks: Path | None = typer.Option(
        None, "--landmarks", help="Folder of <case>.json landmark files (the synthetic cohort writes them)."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Map every cached scan to a common reference frame (stored in the cache); report landmark errors in mm."""
    from volcontrast.spatial.landmarks import correspond as run_correspond

    report = run_correspond(cache, provider, landmarks, progress=not quiet)
    _echo(f"{report['provider']}: {report['computed']} computed, {report['reused']} reused, "
          f"{len(report['failed'])} failed -> {cache / 'correspondence' / report['provider'] / 'report.json'}")


# -------------------------------------------------------------------------------------- benchmark, demo


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(what, f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(what, f"expected comma-separated numbers, got {text!r}") from None


@app.command()
def benchmark(
    cache: Path = typer.Argument(..., help="Cache folder with labelled cases."),
    out: Path = typer.Option(..., "--out", help="Folder for runs, results.csv, results.md and results.png."),
    methods: str | None = typer.Option(None, "--methods", help="e.g. scratch,simclr,gcl,pcl,pcl@2d,scratch@2d."),
    labeled: str | None = typer.Option(None, "--labeled", help="Labelled training volumes per run, e.g. 1,2,4."),
    val: int | None = typer.Option(None, "--val", min=0,
                                   help="+ N labelled validation volumes per run for checkpoint choice (default 0); "
                                        "the budget reported is M = labeled + val."),
    lr_sweep: str | None = typer.Option(None, "--lr-sweep",
                                        help="Sweep scratch's learning rate first over these values (e.g. "
                                             "1e-3,3e-3,1e-2) on a fold's validation cases, never its test fold."),
    lr_sweep_methods: str | None = typer.Option(None, "--lr-sweep-methods",
                                                help="Whose learning rate the sweep chooses: scratch (default), a "
                                                     "list (scratch,pcl) or all (the same effort for every method)."),
    scratch_lr: float | None = typer.Option(None, "--scratch-lr", help="Scratch's learning rate (skips a sweep)."),
    eval_at: str | None = typer.Option(None, "--eval-at",
                                       help="Shares of the fine-tuning steps scored on test (default 0.1,0.3,1)."),
    eval_mode: str | None = typer.Option(None, "--eval",
                                         help="finetune (default) or frozen (the frozen-encoder probe, every method)."),
    folds: int | None = typer.Option(None, "--folds", min=2),
    run_folds: str | None = typer.Option(None, "--run-folds", help="Only these folds, e.g. 0,1."),
    seeds: str | None = typer.Option(None, "--seeds", help="e.g. 0,1,2."),
    pretrain_steps: int | None = typer.Option(None, "--pretrain-steps", min=1),
    finetune_steps: int | None = typer.Option(None, "--finetune-steps", min=1),
    pretrain_preset: str | None = typer.Option(None, "--pretrain-preset"),
    finetune_preset: str | None = typer.Option(None, "--finetune-preset"),
    transductive: bool = typer.Option(False, "--transductive", help="Pretrain on every image, test fold included."),
    preset: str | None = typer.Option(None, "--preset",
                                      help="A packaged study: cpu-study (MR, ~57 min on 2 cores), cpu-study-remap, "
                                           "cpu-study-ct, cpu-protocol, gpu-study; --config and options override "
                                           "it."),
    config: Path | None = typer.Option(None, "--config", help="YAML with BenchmarkConfig fields."),
    jobs: int | None = typer.Option(None, "--jobs", min=1,
                                    help="Runs at once, each in its own process with 1/N of the threads (default 1, "
                                         "or the preset's)."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Folds x seeds x label budgets x methods, resumable -> results.csv, results.md, results.png."""
    from volcontrast.bench.benchmark import (
        BenchmarkConfig,
        config_with,
        load_benchmark_preset,
        merge_dicts,
        run_benchmark,
    )
    from volcontrast.config import from_dict, load_yaml

    base = BenchmarkConfig()
    fields = load_benchmark_preset(preset) if preset else {}
    if preset:
        base = from_dict(BenchmarkConfig, fields, where=f"preset {preset}")
    if config:
        try:
            base = from_dict(BenchmarkConfig, merge_dicts(fields, load_yaml(config)), where=str(config))
        except ValueError as exc:
            raise InputError(config, str(exc)) from None
    over = {
        "methods": [m for m in methods.split(",") if m.strip()] if methods else None,
        "labeled": _int_list(labeled, "--labeled"), "folds": folds, "run_folds": _int_list(run_folds, "--run-folds"),
        "seeds": _int_list(seeds, "--seeds"), "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
        "pretrain_preset": pretrain_preset, "finetune_preset": finetune_preset,
        "transductive": transductive or None, "val": val, "scratch_lr": scratch_lr,
        "lr_sweep": _float_list(lr_sweep, "--lr-sweep"), "eval_at": _float_list(eval_at, "--eval-at"),
        "eval": eval_mode, "jobs": jobs,
        "lr_sweep_methods": [m.strip() for m in lr_sweep_methods.split(",") if m.strip()] if lr_sweep_methods
        else None,
    }
    try:
        cfg = config_with(base, over)
    except ValueError as exc:
        raise InputError("benchmark", str(exc)) from None
    results = run_benchmark(cache, out, cfg, progress=not quiet, log=_echo)
    typer.echo((out / "results.md").read_text(encoding="utf-8") if (out / "results.md").exists() else "")
    _echo(f"results: {results}")


def _arm(spec: str) -> tuple[Path, str]:
    folder, sep, method = spec.rpartition(":")
    if not sep or not folder or not method or "/" in method or "\\" in method:
        raise InputError(spec, "expected FOLDER:METHOD, e.g. bench/study:pcl")
    return Path(folder), method


@app.command()
def compare(
    a: str = typer.Argument(..., help="Arm A as FOLDER:METHOD (a benchmark --out folder or its results.csv), e.g. "
                                      "bench/remap:pcl."),
    b: str = typer.Argument(..., help="Arm B as FOLDER:METHOD, e.g. bench/study:scratch."),
    at: float = typer.Option(1.0, "--at", help="Share of the fine-tuning steps scored (default 1, the end)."),
) -> None:
    """Paired Dice difference A − B across two benchmark folders (same split and test cases), with a bootstrap CI."""
    from volcontrast.bench.report import compare_folders, compare_table

    (pa, ma), (pb, mb) = _arm(a), _arm(b)
    records = compare_folders(pa, ma, pb, mb, at=at, log=_echo)
    typer.echo(compare_table(records, a, b), nl=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("volcontrast-demo"), "--out", help="Where the runs and results go."),
    folds: str | None = typer.Option(None, "--folds", help="Test folds to run (default 0; 0,1,2 for all three)."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """The whole path on the built-in cohort: synth -> prepare -> pretrain PCL/SimCLR -> fine-tune -> table."""
    from volcontrast.bench.demo import run_demo

    run_demo(out, folds=_int_list(folds, "--folds"), progress=not quiet, log=_echo)


# ------------------------------------------------------------------------------------------------ bench


@bench_app.command("prepare")
def bench_prepare(
    cases: int = typer.Option(8, "--cases", min=1),
    size: int = typer.Option(96, "--size", min=16, help="Matrix size of the generated cases (cube)."),
    workers: int | None = typer.Option(None, "--workers", min=1),
    out: Path | None = typer.Option(None, "--out", help="Work folder (default: a temporary folder)."),
) -> None:
    """Time `prepare` on a generated synthetic dataset: cases/s and MB/s."""
    from volcontrast.bench.prepare import run_prepare_benchmark

    run_prepare_benchmark(cases=cases, size=size, workers=workers, out=out)


@bench_app.command("pretrain")
def bench_pretrain(
    method: str = typer.Option("pcl", "--method"),
    preset: str = typer.Option("cpu-tiny", "--preset", help="Pretraining preset (gpu-3d: 96³ nnU-Net, 16 views)."),
    cache: Path | None = typer.Option(None, "--cache", help="A prepared cache (default: a generated cohort)."),
    crop: list[int] | None = typer.Option(None, "--crop", help="Crop size, repeat per axis."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps (after --warmup)."),
    warmup: int = typer.Option(5, "--warmup", min=1),
    workers: int | None = typer.Option(None, "--workers", min=0),
    volumes: int | None = typer.Option(None, "--volumes", min=1, help="Volumes per batch."),
    crops_per_volume: int | None = typer.Option(None, "--crops-per-volume", min=1),
    backbone: str | None = typer.Option(None, "--backbone"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (and the reference)."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip the bare DynUNet reference step."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers as JSON."),
) -> None:
    """Time the pretraining pipeline: samples/s, data-wait %, peak memory, MFU, vs a bare DynUNet step."""
    from volcontrast.bench.speed import run_pretrain_benchmark
    from volcontrast.utils.files import atomic_write_json

    result = run_pretrain_benchmark(
        method=method, preset=preset, cache=str(cache) if cache else None, crop=list(crop) if crop else None,
        steps=steps, warmup=warmup, workers=workers, compile=compile, reference=not no_reference,
        backbone=backbone, volumes=volumes, crops_per_volume=crops_per_volume)
    if json_out:
        atomic_write_json(json_out, result)


@bench_app.command("threads")
def bench_threads(
    show: bool = typer.Option(False, "--show", help="Only print the thread settings this process gets (JSON)."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps per setting (median reported)."),
    crop: int = typer.Option(32, "--crop", min=16, help="Cube side of the tiny U-Net's input."),
    busy: int | None = typer.Option(None, "--busy", min=0, help="Competing busy processes (default: one per CPU)."),
    no_compare: bool = typer.Option(False, "--no-compare", help="Skip the plain-torch-default setting."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers as JSON."),
) -> None:
    """Step time alone and under one competing busy process per CPU (started by the benchmark): the slowdown."""
    import json

    from volcontrast.utils.files import atomic_write_json
    from volcontrast.utils.threads import thread_report

    if show:
        typer.echo(json.dumps(thread_report()))
        return
    from volcontrast.bench.threads import run_threads_benchmark, threads_table

    result = run_threads_benchmark(steps=steps, crop=crop, busy=busy, compare_default=not no_compare)
    typer.echo(threads_table(result))
    if json_out:
        atomic_write_json(json_out, result)


@bench_app.command("loader")
def bench_loader(
    cache: Path | None = typer.Option(None, "--cache", help="A prepared cache (default: a generated cohort)."),
    crop: int = typer.Option(96, "--crop", min=8, help="Crop cube side (the box adds the augmentation context)."),
    workers: str = typer.Option("1,2,4", "--workers", help="Worker counts to time, e.g. 0,1,2,4."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed batches per worker count."),
    volumes: int = typer.Option(4, "--volumes", min=1, help="Volumes per batch."),
    crops_per_volume: int = typer.Option(2, "--crops-per-volume", min=1),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers as JSON."),
) -> None:
    """What the CPU loader alone delivers: crops/s, views/s and MB/s per worker count, vs an H100's 232 views/s."""
    from volcontrast.bench.loader import loader_table, run_loader_benchmark
    from volcontrast.utils.files import atomic_write_json

    counts = _int_list(workers, "--workers") or [0]
    result = run_loader_benchmark(cache=str(cache) if cache else None, crop=crop, workers=tuple(counts), steps=steps,
                                  volumes_per_batch=volumes, crops_per_volume=crops_per_volume)
    typer.echo(loader_table(result))
    if json_out:
        atomic_write_json(json_out, result)


@bench_app.command("gpu")
def bench_gpu(
    out: Path = typer.Option(Path("gpu-runbook"), "--out", help="Folder for gpu_runbook.json and gpu_runbook.md."),
    smoke: bool = typer.Option(False, "--smoke", help="Run on the CPU at tiny sizes (seconds): the CI check."),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated methods (default: all registered)."),
    cache: Path | None = typer.Option(None, "--cache", help="A prepared cache (default: a generated cohort)."),
    budget: float = typer.Option(480.0, "--budget-s", min=10.0, help="Wall-time budget; later methods are skipped."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Timed steps per measurement."),
) -> None:
    """The GPU run book: CUDA-path checks, every method at 96³ vs the bare compiled DynUNet step, PDCR/UAFS."""
    from volcontrast.bench.gpu import run_gpu_runbook

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    run_gpu_runbook(out, smoke=smoke, methods=chosen, cache=str(cache) if cache else None, budget_s=budget,
                    steps=steps)
    typer.echo((out / "gpu_runbook.md").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ entry


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input -> one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="volcontrast")
    except InputError as exc:
        typer.echo(f"error: {exc.line()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
