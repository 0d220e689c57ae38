"""Dataset discovery: turn a user's folder or list into cases.

Accepted layouts (``open_dataset`` tells them apart):

(a) Medical Segmentation Decathlon: ``dataset.json`` with a ``"training"`` list of ``{"image", "label"}``
    and an optional ``"test"`` list, files under ``imagesTr/``, ``labelsTr/``, ``imagesTs/``;
(b) nnU-Net v2 raw: ``dataset.json`` with ``channel_names``, ``labels``, ``file_ending``; images
    ``imagesTr/CASE_0000<ending>`` (one file per channel), labels ``labelsTr/CASE<ending>``;
(c) a plain folder of scans (any accepted format, DICOM series as sub-folders); a file whose name holds
    ``_label`` or ``_seg`` is the label map of the scan next to it (``a_seg.nii.gz`` -> ``a.nii.gz``, else the
    one ``a_*`` scan), refused with one line when that is not clear;
(d) a CSV (columns ``image`` [, ``label``] [, ``id``] [, ``modality``] [, ``label_names``]) or JSON list
    (``[{"image": ..., "label": ...}]``, or ``{"labels": {...}, "cases": [...]}``) of paths, relative to the
    list file. ``modality`` (ct/mr) per case must be the same on every row; ``label_names`` is
    ``1:liver;2:tumour`` (CSV) or a ``{"1": "liver"}`` object (JSON).

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
    modality: str | None = None  # channel 0: "ct" | "mr" | None (unknown: decided at prepare time)
    channels_in_file: int = 1  # MSD multi-modal images keep all channels in one 4D file
    modalities: list[str] | None = None  # one per channel, when the dataset says it
    modality_why: str = ""  # where ``modalities`` came from (shown in prepare's fingerprint)
    case_modalities: dict[str, str] = field(default_factory=dict)  # case id -> "ct"/"mr" a list names

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


def _modalities_from_names(names: list[str]) -> list[str]:
    """Per channel: a channel named CT is CT (dataset-wide HU window); any other name is z-scored per volume."""
    return ["ct" if n.strip().upper() == "CT" else "mr" for n in names]


MODALITY_WORDS = {"ct": "ct", "mr": "mr", "mri": "mr"}


def parse_label_names(text: str, where: Path, what: str) -> dict[int, str]:
    """``"1:liver;2:tumour"`` (``;`` or ``|`` between entries, ``:`` or ``=`` inside) -> ``{1: "liver", ...}``."""
    out: dict[int, str] = {}
    for item in re.split(r"[;|]", text):
        if not item.strip():
            continue
        m = re.fullmatch(r"\s*(\d+)\s*[:=]\s*(.*?)\s*", item)
        if not m or not m[2]:
            raise InputError(where, f"{what}: label names must look like 1:liver;2:tumour, got {text!r}")
        out[int(m[1])] = m[2]
    return out


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
                   _modality_from_names(channel_names), channels_in_file=len(channel_names),
                   modalities=_modalities_from_names(channel_names), modality_why="dataset.json modality")


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
                   _modality_from_names(channel_names), modalities=_modalities_from_names(channel_names),
                   modality_why="dataset.json channel_names")


LABEL_TOKEN = re.compile(r"_(label|seg)", re.IGNORECASE)


def _open_folder(root: Path) -> Dataset:
    cases: list[Case] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if d != root and any(not scan_suffix(f) for f in filenames) and is_dicom_dir(d):
            cases.append(Case(_safe_id(str(d.relative_to(root))), (d,), None))
            dirnames[:] = []
            continue
        scans = [f for f in sorted(filenames) if scan_suffix(f) and not f.startswith(".")]
        for image, label in _pair_labels(d, scans):
            rel = (d / image).relative_to(root)
            cases.append(Case(_safe_id(strip_scan_suffix(str(rel))), (d / image,),
                              d / label if label else None))
    return Dataset(root, "folder", _check_unique(cases, root))


def _pair_labels(d: Path, scans: list[str]) -> list[tuple[str, str | None]]:
    """(image, label or None) for the scans of one folder: a name holding ``_label``/``_seg`` is a label map; it
    belongs to the scan named as the text before that (``a_seg.nii.gz`` -> ``a.nii.gz``), else to the one scan
    ``a_*``. InputError when a label has no scan, could belong to several, or two labels claim one scan."""
    labels = [f for f in scans if LABEL_TOKEN.search(strip_scan_suffix(f))]
    images = [f for f in scans if f not in labels]
    owner: dict[str, str] = {}
    for lab in labels:
        stem = strip_scan_suffix(lab)
        base = stem[: LABEL_TOKEN.search(stem).start()]  # type: ignore[union-attr]
        exact = [f for f in images if strip_scan_suffix(f) == base]
        near = exact or [f for f in images if strip_scan_suffix(f).startswith(base + "_")]
        if not base or not near:
            want = f"{base or '<name>'}{scan_suffix(lab)}"
            raise InputError(d / lab, f"label map with no scan next to it (expected {want}); list image/label pairs"
                                      " in a CSV (columns image,label)")
        if len(near) > 1:
            raise InputError(d / lab, f"cannot tell which scan this label map belongs to ({' or '.join(near[:3])});"
                                      " list image/label pairs in a CSV (columns image,label)")
        if near[0] in owner:
            raise InputError(d / near[0], f"two label maps name this scan ({owner[near[0]]} and {lab}); keep one")
        owner[near[0]] = lab
    return [(f, owner.get(f)) for f in images]


def _list_rows(path: Path) -> tuple[list[dict], dict[int, str]]:
    """The rows of a CSV/JSON list, and the label names a JSON object gives at its top level (``"labels"``)."""
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
            if not reader.fieldnames or "image" not in [h.strip() for h in reader.fieldnames]:
                raise InputError(path, 'CSV needs a header with an "image" column (and optional "label", "id")')
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if isinstance(k, str) and k}
                    for r in reader]
        except csv.Error as exc:
            raise InputError(path, f"not a valid CSV file: {exc}") from None
        return rows, {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    names: dict[int, str] = {}
    if isinstance(data, dict):
        names = _label_names(data.get("labels") or data.get("label_names") or {}, path)
        data = data.get("training", data.get("cases"))
    if not isinstance(data, list):
        raise InputError(path, 'JSON list must be [{"image": ..., "label": ...}, ...]')
    return [r if isinstance(r, dict) else {"image": r} for r in data], names


def _row_label_names(value: object, path: Path, row: int) -> dict[int, str]:
    if isinstance(value, dict):
        return _label_names(value, path)
    if isinstance(value, str):
        return parse_label_names(value, path, f"row {row}")
    raise InputError(path, f'row {row}: "label_names" must be text like 1:liver;2:tumour or an object')


def _open_list(path: Path) -> Dataset:
    base = path.parent
    rows, label_names = _list_rows(path)
    cases = []
    names_row = 0
    by_modality: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if not r.get("image"):
            raise InputError(path, f"row {i + 1} has no image path")
        image = _resolve(base, r["image"], path, f'row {i + 1}: "image"')
        label = _resolve(base, r["label"], path, f'row {i + 1}: "label"') if r.get("label") else None
        cid = _safe_id(str(r.get("id") or strip_scan_suffix(image.name)))
        cases.append(Case(cid, (image,), label))
        if r.get("modality"):
            word = MODALITY_WORDS.get(str(r["modality"]).strip().lower())
            if word is None:
                raise InputError(path, f"row {i + 1}: modality must be ct or mr, got {str(r['modality'])[:20]!r}")
            by_modality.setdefault(word, []).append(i + 1)
        if r.get("label_names"):
            names = _row_label_names(r["label_names"], path, i + 1)
            if label_names and names != label_names:
                where = f"row {names_row}'s" if names_row else "the list's"
                raise InputError(path, f"row {i + 1}: label names {_show(names)} differ from {where}"
                                       f" {_show(label_names)}; give the same names on every row (or on one only)")
            label_names, names_row = names, names_row or i + 1
    if label_names and 0 not in label_names:
        label_names = {0: "background", **label_names}
    if len(by_modality) > 1:
        ct, mr = by_modality["ct"], by_modality["mr"]
        raise InputError(path, f"rows name both CT ({_rows(ct)}) and MR ({_rows(mr)}); a dataset has one modality"
                               " per channel: split the list into a CT and an MR dataset")
    cases = _check_unique(cases, path)
    listed = {cases[r - 1].id: word for word, rs in by_modality.items() for r in rs}
    modalities, why = None, ""
    if by_modality and len(listed) == len(cases):  # else prepare looks at the other cases' intensities
        modalities, why = [next(iter(by_modality))], f"{path.name} modality column"
    return Dataset(path, "list", cases, label_names, modality=modalities[0] if modalities else None,
                   modalities=modalities, modality_why=why, case_modalities=listed)


def _rows(rows: list[int]) -> str:
    head = ", ".join(str(r) for r in rows[:3])
    return f"row{'s' if len(rows) > 1 else ''} {head}{', ...' if len(rows) > 3 else ''}"


def _show(names: dict[int, str]) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(names.items()))


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
