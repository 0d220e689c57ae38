"""Dataset discovery: turn a user's folder or list into cases.

Accepted layouts (``open_dataset`` tells them apart):

(a) Medical Segmentation Decathlon: ``dataset.json`` with a ``"training"`` list of ``{"image", "label"}``
    and an optional ``"test"`` list, files under ``imagesTr/``, ``labelsTr/``, ``imagesTs/``;
(b) nnU-Net v2 raw: ``dataset.json`` with ``channel_names``, ``labels``, ``file_ending``; images
    ``imagesTr/CASE_0000<ending>`` (one file per channel), labels ``labelsTr/CASE<ending>``;
(c) a plain folder of scans (unlabelled; any accepted format, DICOM series as sub-folders);
(d) a CSV (columns ``image`` [, ``label``] [, ``id``]) or JSON list (``[{"image": ..., "label": ...}]``)
    of paths, relative to the list file.

Unlabelled test images (``imagesTs``) are kept as unlabelled cases: they are pretraining material.
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from volcontrast.errors import InputError
from volcontrast.io.readers import SCAN_SUFFIXES, is_dicom_dir, scan_suffix, strip_scan_suffix
from volcontrast.utils.files import read_text, stable_hash

LAYOUTS = ("msd", "nnunet", "folder", "list")


@dataclass(frozen=True)
class Case:
    """One scan (one file per channel) and its optional label map."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None

    def sources(self) -> list[Path]:
        return [*self.images, *([self.label] if self.label else [])]


@dataclass
class Dataset:
    """Cases plus what the dataset says about them."""

    root: Path
    layout: str
    cases: list[Case]
    label_names: dict[int, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=lambda: ["image"])
    modality: str | None = None  # "ct" | "mr" | None (unknown: decided at prepare time)
    channels_in_file: int = 1  # MSD multi-modal images keep all channels in one 4D file

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.labelled]

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


def _safe_id(text: str) -> str:
    """A folder-safe case id: letters and digits of any script, ``_``, ``.``, ``-``; other runs become ``_``.
    A name with none of those gets ``case-<hash of the name>`` (stable, distinct for distinct names)."""
    safe = re.sub(r"[^\w.-]+", "_", text).strip("._")
    return safe if safe else f"case-{stable_hash(text)[:10]}"


def _modality_from_names(names: list[str]) -> str:
    return "ct" if names and names[0].strip().upper() == "CT" else "mr"


_ALLOW_OUTSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_outside", default=False)


def _resolve(base: Path, rel: object, listed_in: Path, what: str = "path") -> Path:
    """A listed path, relative to ``base``; it must stay inside ``base`` (no ``..`` out of it, no absolute path
    elsewhere) unless ``open_dataset(..., allow_outside=True)``."""
    if not isinstance(rel, str) or not rel.strip():
        raise InputError(listed_in, f"{what} must be a file path (a string), got {json.dumps(rel)[:60]}")
    p = Path(rel)
    p = p if p.is_absolute() else (base / p)
    p = Path(os.path.normpath(p))
    top = Path(os.path.normpath(base.absolute()))
    if not _ALLOW_OUTSIDE.get() and not Path(os.path.normpath(p.absolute())).is_relative_to(top):
        raise InputError(listed_in, f"{what} {rel!r} is outside the dataset folder {base}; use --allow-outside"
                                    " if that is intended")
    if not p.exists():
        raise InputError(p, f"file listed in {listed_in} is missing")
    return p


def _check_unique(cases: list[Case], where: Path) -> list[Case]:
    """Refuse a scan listed twice; two different scans whose names give the same id (``a b`` and ``a_b``) keep
    their ids apart with a stable suffix from the file path."""
    seen: dict[str, Case] = {}
    for i, c in enumerate(cases):
        if c.id in seen:
            if seen[c.id].images == c.images:
                raise InputError(where, f"the scan {c.images[0]} is listed twice (case id {c.id!r})")
            c = Case(f"{c.id}-{stable_hash(str(c.images[0]))[:6]}", c.images, c.label)
            if c.id in seen:
                raise InputError(where, f"two cases share the id {c.id!r} ({seen[c.id].images[0]} and {c.images[0]})")
            cases[i] = c
        seen[c.id] = c
    if not cases:
        raise InputError(where, "no scans found (accepted: " + ", ".join(SCAN_SUFFIXES) + ", DICOM folders)")
    return cases


def _read_dataset_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "dataset.json must be a JSON object")
    return data


def _open_msd(root: Path, meta: dict, dj: Path) -> Dataset:
    training = meta.get("training")
    if not isinstance(training, list):
        raise InputError(dj, '"training" must be a list of {"image": ..., "label": ...}')
    modality = meta.get("modality") or {"0": "image"}
    channel_names = _channel_names(modality, dj, "modality")
    cases: list[Case] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(dj, f'training entry {i} has no "image"')
        image = _resolve(root, entry["image"], dj, f'training entry {i}: "image"')
        label = _resolve(root, entry["label"], dj, f'training entry {i}: "label"') if entry.get("label") else None
        cases.append(Case(_safe_id(strip_scan_suffix(image.name)), (image,), label))
    test = meta.get("test") or []
    if not isinstance(test, list):
        raise InputError(dj, '"test" must be a list of image paths')
    for i, entry in enumerate(test):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        image = _resolve(root, rel, dj, f"test entry {i}")
        cases.append(Case(_safe_id(strip_scan_suffix(image.name)), (image,), None))
    label_names = _label_names(meta.get("labels") or {}, dj)
    return Dataset(root, "msd", _check_unique(cases, dj), label_names, channel_names,
                   _modality_from_names(channel_names), channels_in_file=len(channel_names))


def _int_key(k: object) -> int | None:
    try:
        return int(str(k).strip())
    except ValueError:
        return None


def _channel_names(names: object, dj: Path, key: str) -> list[str]:
    """``{"0": "CT", "1": "PET"}`` -> ``["CT", "PET"]``; InputError unless the keys are the indices 0..n-1."""
    if not isinstance(names, dict) or not names:
        raise InputError(dj, f'"{key}" must map channel indices to names, e.g. {{"0": "CT"}}')
    index = {k: _int_key(k) for k in names}
    if any(v is None for v in index.values()) or sorted(index.values()) != list(range(len(names))):
        raise InputError(dj, f'"{key}" keys must be the channel indices "0", "1", ..., got {list(names)[:4]}')
    return [str(names[k]) for k in sorted(names, key=lambda k: index[k])]


def _label_names(labels: object, dj: Path) -> dict[int, str]:
    """Label value -> name from MSD style ``{"0": "background", "1": "liver"}`` or nnU-Net style
    ``{"background": 0, "liver": 1}`` (region lists are skipped)."""
    if not labels:
        return {}
    if not isinstance(labels, dict):
        raise InputError(dj, '"labels" must map label values to names (or names to values)')
    if all(_int_key(k) is not None for k in labels):
        return {int(str(k).strip()): str(v) for k, v in labels.items()}
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            continue
        if isinstance(value, bool) or _int_key(value) is None:
            raise InputError(dj, f'"labels" must map names to integer values; {name!r} has {json.dumps(value)[:40]}')
        out[int(str(value).strip())] = str(name)
    return out


def _open_nnunet(root: Path, meta: dict, dj: Path) -> Dataset:
    names = meta.get("channel_names") or meta.get("modality")
    channel_names = _channel_names(names, dj, "channel_names")
    ending = str(meta.get("file_ending", ".nii.gz"))
    label_names = _label_names(meta.get("labels") or {}, dj)
    n_ch = len(channel_names)
    cases: list[Case] = []
    if isinstance(meta.get("dataset"), dict):  # explicit file lists (nnU-Net v2 option)
        for cid, entry in meta["dataset"].items():
            paths = entry.get("images") if isinstance(entry, dict) else None
            if not isinstance(paths, list) or not paths:
                raise InputError(dj, f'"dataset" entry {cid!r} needs an "images" list of paths')
            images = tuple(_resolve(root, p, dj, f'"dataset" entry {cid!r}: image') for p in paths)
            label = (_resolve(root, entry["label"], dj, f'"dataset" entry {cid!r}: "label"')
                     if entry.get("label") else None)
            cases.append(Case(_safe_id(cid), images, label))
    else:
        for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
            img_dir = root / folder
            if not img_dir.is_dir():
                if folder == "imagesTr":
                    raise InputError(img_dir, "nnU-Net raw dataset has no imagesTr folder")
                continue
            pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
            groups: dict[str, dict[int, Path]] = {}
            for f in sorted(img_dir.iterdir()):
                m = pattern.match(f.name)
                if m:
                    groups.setdefault(m["case"], {})[int(m["ch"])] = f
            for cid, chans in sorted(groups.items()):
                missing = [i for i in range(n_ch) if i not in chans]
                if missing:
                    want = img_dir / f"{cid}_{missing[0]:04d}{ending}"
                    raise InputError(want, f"channel {missing[0]} of case {cid} is missing")
                label = None
                if labelled:
                    label = root / "labelsTr" / f"{cid}{ending}"
                    if not label.exists():
                        raise InputError(label, f"label of training case {cid} is missing")
                cases.append(Case(_safe_id(cid), tuple(chans[i] for i in range(n_ch)), label))
        n_train = meta.get("numTraining")
        found = sum(c.labelled for c in cases)
        if isinstance(n_train, int) and found < n_train:
            raise InputError(dj, f"numTraining is {n_train} but only {found} training cases were found in imagesTr")
    return Dataset(root, "nnunet", _check_unique(cases, dj), label_names, channel_names,
                   _modality_from_names(channel_names))


def _open_folder(root: Path) -> Dataset:
    cases: list[Case] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if d != root and any(not scan_suffix(f) for f in filenames) and is_dicom_dir(d):
            cases.append(Case(_safe_id(str(d.relative_to(root))), (d,), None))
            dirnames[:] = []
            continue
        for f in sorted(filenames):
            if scan_suffix(f) and not f.startswith("."):
                rel = (d / f).relative_to(root)
                cases.append(Case(_safe_id(strip_scan_suffix(str(rel))), (d / f,), None))
    return Dataset(root, "folder", _check_unique(cases, root))


def _open_list(path: Path) -> Dataset:
    base = path.parent
    rows: list[dict]
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
            if not reader.fieldnames or "image" not in [h.strip() for h in reader.fieldnames]:
                raise InputError(path, 'CSV needs a header with an "image" column (and optional "label", "id")')
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if isinstance(k, str) and k}
                    for r in reader]
        except csv.Error as exc:
            raise InputError(path, f"not a valid CSV file: {exc}") from None
    else:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data = data.get("training", data.get("cases"))
        if not isinstance(data, list):
            raise InputError(path, 'JSON list must be [{"image": ..., "label": ...}, ...]')
        rows = [r if isinstance(r, dict) else {"image": r} for r in data]
    cases = []
    for i, r in enumerate(rows):
        if not r.get("image"):
            raise InputError(path, f"row {i + 1} has no image path")
        image = _resolve(base, r["image"], path, f'row {i + 1}: "image"')
        label = _resolve(base, r["label"], path, f'row {i + 1}: "label"') if r.get("label") else None
        cid = _safe_id(str(r.get("id") or strip_scan_suffix(image.name)))
        cases.append(Case(cid, (image,), label))
    return Dataset(path, "list", _check_unique(cases, path))


def open_dataset(path: str | os.PathLike, *, allow_outside: bool = False) -> Dataset:
    """Discover the cases of a dataset in any accepted layout (see module docstring).

    ``allow_outside``: accept files listed in a dataset.json or list that lie outside its folder (``../``,
    absolute paths elsewhere); refused by default.

    Raises:
        InputError: missing path, empty folder, a listed file that does not exist or lies outside the dataset
            folder, malformed dataset.json.
    """
    token = _ALLOW_OUTSIDE.set(allow_outside)
    try:
        return _open_dataset(Path(path))
    finally:
        _ALLOW_OUTSIDE.reset(token)


def _open_dataset(p: Path) -> Dataset:
    if not p.exists():
        raise InputError(p, "dataset path not found")
    if p.is_file():
        if p.name == "dataset.json":
            return _open_dataset(p.parent)
        if p.suffix.lower() in (".csv", ".json"):
            return _open_list(p)
        raise InputError(p, "expected a dataset folder, a dataset.json, or a .csv/.json list of scans")
    dj = p / "dataset.json"
    if dj.is_file():
        meta = _read_dataset_json(dj)
        if "training" in meta and isinstance(meta["training"], list):
            return _open_msd(p, meta, dj)
        if "channel_names" in meta or "file_ending" in meta:
            return _open_nnunet(p, meta, dj)
        raise InputError(dj, 'neither an MSD ("training" list) nor an nnU-Net v2 ("channel_names") dataset.json')
    if is_dicom_dir(p):
        return Dataset(p, "folder", [Case(_safe_id(p.name), (p,), None)])
    return _open_folder(p)
