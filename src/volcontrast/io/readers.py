"""Reading and writing scans: NIfTI and MGZ through nibabel, NRRD/MHA/MHD and DICOM series through SimpleITK.

Everything read is checked (3D, finite, integer labels) and returned in canonical RAS+ orientation as a
:class:`~volcontrast.io.volume.Volume`. Any problem is an :class:`~volcontrast.errors.InputError` naming
the file.
"""

from __future__ import annotations

import contextlib
import locale
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from volcontrast.errors import InputError
from volcontrast.io.volume import (
    Volume,
    affine_spacing,
    canonical_transform,
    reorient_affine,
    reorient_array,
    to_canonical,
)
from volcontrast.utils.files import atomic_save

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES
DICOM_SUFFIXES = (".dcm", ".ima", "")

# ITK stores geometry in LPS; nibabel and volcontrast use RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def scan_suffix(path: str | os.PathLike) -> str:
    """The recognised scan suffix of ``path`` ('.nii.gz', '.nrrd', ...) or '' if none."""
    name = str(path).lower()
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


@contextlib.contextmanager
def preserve_locale() -> Iterator[None]:
    """GDCM (SimpleITK's DICOM layer) resets the process locale to "C"; put it back afterwards. ITK's global
    warnings (e.g. GDCM's "No Series were found" for every plain folder) are silenced meanwhile: our errors are
    one line of our own."""
    saved = locale.setlocale(locale.LC_ALL)
    with quiet_itk():
        try:
            yield
        finally:
            locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Turn off ITK's global warning display (it writes to stderr directly) for the duration."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_dicom_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        with preserve_locale():
            return len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))) > 0
    except RuntimeError:
        return False


def strip_scan_suffix(name: str) -> str:
    suffix = scan_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


@dataclass(frozen=True)
class Geometry:
    """Header-only geometry of a scan, in canonical RAS+ orientation."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    channels: int = 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        return affine_spacing(self.affine)


# --------------------------------------------------------------------------------------------------------
# raw readers: (array as stored with spatial axes first, RAS affine as stored)


def _sitk_to_raw(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    dim = image.GetDimension()
    arr = sitk.GetArrayFromImage(image)  # (z, y, x[, components]) for 3D: reverse the spatial axes
    n_comp = image.GetNumberOfComponentsPerPixel()
    spatial_axes = list(range(dim))[::-1]
    arr = np.transpose(arr, [*spatial_axes, dim] if n_comp > 1 else spatial_axes)
    affine = np.eye(4)
    if dim >= 3:
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        spacing = np.asarray(image.GetSpacing()[:3], dtype=np.float64)
        origin = np.asarray(image.GetOrigin()[:3], dtype=np.float64)
        affine[:3, :3] = direction * spacing[None, :]
        affine[:3, 3] = origin
    elif dim == 2:
        raise InputError(None, "2D image where a 3D volume is expected")
    return arr, LPS_TO_RAS @ affine


def _read_dicom_series(path: Path) -> sitk.Image:
    with preserve_locale():
        return _read_dicom_series_unguarded(path)


def _read_dicom_series_unguarded(path: Path) -> sitk.Image:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise InputError(path, "folder holds no DICOM series")
    if len(ids) > 1:
        raise InputError(path, f"folder holds {len(ids)} DICOM series; give one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _read_raw(path: Path, want_float: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array (spatial axes first, as stored) and RAS affine, without any checks."""
    suffix = scan_suffix(path)
    if path.is_dir():
        return _sitk_to_raw(_read_dicom_series(path))
    if suffix in NIBABEL_SUFFIXES:
        img = nib.load(str(path))
        if want_float:
            arr = img.get_fdata(dtype=np.float32)
        else:
            arr = np.asanyarray(img.dataobj)
        return np.asarray(arr), np.asarray(img.affine, dtype=np.float64)
    if suffix in SITK_SUFFIXES:
        with quiet_itk():
            return _sitk_to_raw(sitk.ReadImage(str(path)))
    raise InputError(path, f"unknown scan format (accepted: {', '.join(SCAN_SUFFIXES)} or a DICOM folder)")


def _squeeze_to_3d(arr: np.ndarray, path: Path, channels: int | None) -> np.ndarray:
    """(X, Y, Z) or, when ``channels`` > 1 and the 4th axis holds them, (C, X, Y, Z)."""
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        arr = arr[:, :, :, 0, :]
    if arr.ndim < 3:
        raise InputError(path, f"{arr.ndim}D image (shape {tuple(arr.shape)}) where a 3D volume is expected")
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4 and channels is not None and channels > 1 and arr.shape[3] == channels:
        return np.moveaxis(arr, 3, 0)
    raise InputError(
        path, f"{arr.ndim}D image (shape {tuple(arr.shape)}) where a 3D volume is expected"
    )


def _as_label(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 3:
        raise InputError(path, f"label map must be 3D, got shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(path, "label map contains NaN or infinite values")
        rounded = np.rint(arr)
        bad = np.abs(arr - rounded) > 1e-3
        if bad.any():
            example = float(arr[bad].flat[0])
            raise InputError(path, f"label map has non-integer values (e.g. {example:g}); labels must be integers")
        arr = rounded
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise InputError(path, f"label map has unsupported data type {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0:
        raise InputError(path, f"label map has negative values (min {lo}); labels must be 0, 1, 2, ...")
    dtype = np.uint8 if hi < 256 else (np.uint16 if hi < 65536 else np.int32)
    return arr.astype(dtype, copy=False)


def load_volume(
    path: str | os.PathLike, *, label: bool = False, channels: int | None = None
) -> Volume:
    """Read a scan and return it in canonical RAS+ orientation.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mgz``/``.nrrd``/``.mha``/``.mhd`` file or a DICOM series folder.
        label: read a label map (integer values >= 0, stored as the smallest unsigned type) instead of an
            image (float32, finite).
        channels: for an image, the number of channels a 4D file may hold (e.g. MSD multi-modal);
            the result is then ``(C, X, Y, Z)``. ``None``/1: a 4D file is an error.

    Raises:
        InputError: unreadable/corrupt file, not 3D, NaN/inf voxels, non-integer labels.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    try:
        arr, affine = _read_raw(p, want_float=not label)
    except InputError as exc:
        if exc.where is None:
            raise InputError(p, exc.problem) from None
        raise
    except Exception as exc:  # nibabel / ITK raise many types for truncated or corrupt files
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(p, f"cannot read scan (corrupt or truncated?): {msg}") from None
    arr = _squeeze_to_3d(arr, p, None if label else channels)
    _check_affine(p, affine, arr.shape[-3:])
    if label:
        arr = _as_label(arr, p)
    else:
        arr = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            n_bad = int((~np.isfinite(arr)).sum())
            raise InputError(p, f"image contains {n_bad} NaN or infinite voxels")
    original_shape = tuple(int(s) for s in arr.shape[-3:])
    canonical, canonical_affine = to_canonical(arr, affine)
    return Volume(
        array=canonical,
        affine=canonical_affine,
        original_affine=affine,
        original_shape=original_shape,
        path=str(p),
    )


def _check_affine(p: Path, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """InputError unless ``affine`` is finite, invertible and maps each voxel axis to a distinct world axis."""
    bad = "scan has an invalid (singular or non-finite) affine / direction matrix"
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(p, bad)
    try:
        canonical_transform(affine, shape)
    except Exception:  # nibabel: "We cannot invert orientation transform", numpy: "SVD did not converge"
        raise InputError(p, bad) from None


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Shape and canonical affine from the header alone (no voxel data read, except for DICOM)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    try:
        if p.is_dir():
            arr, affine = _sitk_to_raw(_read_dicom_series(p))
            shape = arr.shape
        elif scan_suffix(p) in NIBABEL_SUFFIXES:
            img = nib.load(str(p))
            shape, affine = img.shape, np.asarray(img.affine, dtype=np.float64)
        elif scan_suffix(p) in SITK_SUFFIXES:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            with quiet_itk():
                reader.ReadImageInformation()
            dim = reader.GetDimension()
            size = reader.GetSize()
            shape = tuple(size) + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
            if dim < 3:
                raise InputError(p, "2D image where a 3D volume is expected")
            direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
            affine = np.eye(4)
            affine[:3, :3] = direction * np.asarray(reader.GetSpacing()[:3])[None, :]
            affine[:3, 3] = reader.GetOrigin()[:3]
            affine = LPS_TO_RAS @ affine
        else:
            raise InputError(p, f"unknown scan format (accepted: {', '.join(SCAN_SUFFIXES)} or a DICOM folder)")
    except InputError as exc:
        if exc.where is None:
            raise InputError(p, exc.problem) from None
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(p, f"cannot read scan header (corrupt or truncated?): {msg}") from None
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise InputError(p, f"{len(shape)}D image (shape {shape}) where a 3D volume is expected")
    _check_affine(p, affine, shape[:3])
    channels = 1
    spatial = shape[:3]
    extra = [s for s in shape[3:] if s != 1]
    if extra:
        channels = int(np.prod(extra))
    ornt, canonical_affine = canonical_transform(affine, spatial)
    canonical_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        canonical_shape[int(target)] = spatial[axis]
    return Geometry(shape=tuple(canonical_shape), affine=canonical_affine, channels=channels)  # type: ignore[arg-type]


def geometry_mismatch(
    shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...], affine_b: np.ndarray,
    tolerance_voxels: float = 0.05,
) -> str | None:
    """Why two grids differ (shape, or corner positions further apart than ``tolerance_voxels``), or None."""
    if tuple(shape_a[-3:]) != tuple(shape_b[-3:]):
        return f"shape {tuple(shape_a[-3:])} vs {tuple(shape_b[-3:])}"
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape_a[-3] - 1) for j in (0, shape_a[-2] - 1) for k in (0, shape_a[-1] - 1)]
    )
    pa = corners @ np.asarray(affine_a).T
    pb = corners @ np.asarray(affine_b).T
    dist = float(np.linalg.norm(pa[:, :3] - pb[:, :3], axis=1).max())
    tol = tolerance_voxels * min(affine_spacing(affine_a))
    if dist > tol:
        return f"world geometry differs by up to {dist:.3g} mm (tolerance {tol:.3g} mm)"
    return None


def check_same_grid(image: Volume, label: Volume) -> None:
    """Raise InputError (naming the label file) if image and label do not share shape and world geometry."""
    why = geometry_mismatch(image.shape, image.affine, label.shape, label.affine)
    if why:
        raise InputError(label.path, f"label does not match image {image.path}: {why}")


def save_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    like: Volume | np.ndarray | None = None,
) -> Path:
    """Write a 3D array (with its RAS ``affine``) to ``path`` atomically.

    ``like`` chooses the stored axis layout: a :class:`Volume` (its original orientation), an affine whose
    axis directions are copied (e.g. :func:`~volcontrast.io.volume.orientation_affine` ``("LPS")``), or
    ``None`` (as given). The format follows the suffix: NIfTI/MGZ via nibabel, NRRD/MHA/MHD via SimpleITK.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if like is not None:
        target = like.original_affine if isinstance(like, Volume) else np.asarray(like, dtype=np.float64)
        new_affine = reorient_affine(affine, array.shape, target)
        array = reorient_array(array, affine, target)
        affine = new_affine
    suffix = scan_suffix(p)
    if suffix not in NIBABEL_SUFFIXES + SITK_SUFFIXES:
        raise InputError(p, f"cannot write this format (use one of {', '.join(SCAN_SUFFIXES)})")

    def write(tmp: str) -> None:
        if suffix in (".nii", ".nii.gz"):
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, tmp)
        elif suffix in (".mgz", ".mgh"):
            data = array.astype(np.float32) if array.dtype == np.float64 else array
            nib.save(nib.MGHImage(data, affine), tmp)
        else:
            lps = np.linalg.inv(LPS_TO_RAS) @ affine
            spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
            image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
            image.SetSpacing(tuple(float(s) for s in spacing))
            image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()))
            image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
            try:
                with quiet_itk():
                    sitk.WriteImage(image, tmp, useCompression=False)
            except RuntimeError as exc:  # ITK reports a full disk or a read-only folder as a RuntimeError
                first = next((ln for ln in str(exc).splitlines() if "ERROR" in ln or "rror" in ln), str(exc))
                raise InputError(p, f"cannot write (full disk or read-only folder?): {' '.join(first.split())[:200]}"
                                 ) from None

    if suffix == ".mhd":
        return _save_mhd(p, write)
    return atomic_save(p, write, suffix=suffix)


def _save_mhd(p: Path, write) -> Path:
    """MetaImage is a header and a data file (``<stem>.raw``) that it names: write both into a temporary folder,
    move the data file into place, then the header (a reader of the old header sees old or new data whole)."""
    import shutil
    import tempfile

    from volcontrast.utils.files import as_input_error

    tmpdir = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{p.name}-", dir=p.parent))
        write(str(tmpdir / p.name))
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == p.name):  # the header last
            os.replace(f, p.parent / f.name)
    except OSError as exc:
        raise as_input_error(exc, p) from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return p
