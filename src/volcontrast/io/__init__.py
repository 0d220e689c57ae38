"""Scan I/O: every scan comes out as a canonical RAS+ :class:`Volume`."""

from volcontrast.io.readers import (
    SCAN_SUFFIXES,
    Geometry,
    check_same_grid,
    geometry_mismatch,
    is_dicom_dir,
    load_volume,
    read_geometry,
    save_volume,
    scan_suffix,
    strip_scan_suffix,
)
from volcontrast.io.volume import Volume, affine_spacing, orientation_affine, reorient_array, to_canonical

__all__ = [
    "SCAN_SUFFIXES",
    "Geometry",
    "Volume",
    "affine_spacing",
    "check_same_grid",
    "geometry_mismatch",
    "is_dicom_dir",
    "load_volume",
    "orientation_affine",
    "read_geometry",
    "reorient_array",
    "save_volume",
    "scan_suffix",
    "strip_scan_suffix",
    "to_canonical",
]
