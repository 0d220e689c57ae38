"""Render a :class:`~volcontrast.data.anatomy.Subject` at arbitrary atlas points: label and tissue class.

The points are sorted by height once; each structure then only looks at the points inside its own box
(a binary search along z plus a test in x and y), so a 96³ grid renders in a fraction of a second.
Structures are painted in a fixed order, later ones over earlier ones; the label is therefore a function of
the atlas position only, which is what the analytic landmarks and the centroid quadrature rely on.
"""

from __future__ import annotations

import numpy as np

from volcontrast.data.anatomy import _P, _ZT, BODY_Z, LABEL_INDEX, Subject, Tissue, Tube, capsule_excess

T = Tissue


class _Canvas:
    """Points (3, N) sorted by z, with a label and tissue per point."""

    def __init__(self, p: np.ndarray):
        self.order = np.argsort(p[2], kind="stable")
        self.p = np.ascontiguousarray(p[:, self.order])
        self.label = np.zeros(p.shape[1], np.uint8)
        self.tissue = np.full(p.shape[1], T.FAT, np.uint8)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Indices of the points inside the axis-aligned box [lo, hi] (atlas mm)."""
        i0, i1 = np.searchsorted(self.p[2], [lo[2], hi[2]])
        x, y = self.p[0, i0:i1], self.p[1, i0:i1]
        return i0 + np.flatnonzero((x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]))

    def paint(self, idx: np.ndarray, mask: np.ndarray, tissue: int | np.ndarray, label: int | None) -> None:
        j = idx[mask]
        self.tissue[j] = tissue if np.isscalar(tissue) else np.asarray(tissue)[mask]
        if label is not None:
            self.label[j] = label


def _superellipse(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.abs(x / a) ** _P + np.abs(y / b) ** _P) ** (1.0 / _P)


def _cap(z: np.ndarray) -> np.ndarray:
    """Rounded pelvic end of the body: factor on the cross-section below z = 30 mm."""
    return np.sqrt(np.clip(1.0 - (np.maximum(30.0 - z, 0.0) / 50.0) ** 2, 1e-6, 1.0)).astype(np.float32)


def render(subject: Subject, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label (N,) uint8 (0 background, :data:`LABELS` 1-based) and tissue (N,) uint8 at atlas ``points`` (3, N) mm."""
    pts = np.asarray(points, np.float32)
    n = pts.shape[1]
    label, tissue = np.zeros(n, np.uint8), np.full(n, T.AIR, np.uint8)
    x, y, z = pts
    idx = np.flatnonzero((z > BODY_Z[0]) & (z < BODY_Z[1]))
    zi = z[idx]
    cap = _cap(zi)
    a_tot = (np.interp(zi, _ZT, subject.a_lean + subject.fat) * cap).astype(np.float32)
    b_tot = (np.interp(zi, _ZT, subject.b_lean + subject.fat) * cap).astype(np.float32)
    idx = idx[_superellipse(x[idx], y[idx], a_tot, b_tot) < 1.0]
    if idx.size:
        c = _Canvas(pts[:, idx])
        _paint_torso(subject, c)
        label[idx[c.order]] = c.label
        tissue[idx[c.order]] = c.tissue
    return label, tissue


def _paint_torso(s: Subject, c: _Canvas) -> None:
    x, y, z = c.p
    cap = _cap(z)
    a_l = (np.interp(z, _ZT, s.a_lean) * cap).astype(np.float32)
    b_l = (np.interp(z, _ZT, s.b_lean) * cap).astype(np.float32)
    rl = _superellipse(x, y, a_l, b_l)
    thr = 1.0 - s.muscle_mm / np.sqrt(a_l * b_l)
    c.tissue[rl < 1.0] = T.MUSCLE
    cav = (rl < thr) & (z > 12.0) & (z < 648.0)
    j = np.flatnonzero(cav)
    zd = s.diaphragm_z(x[j], y[j])
    c.tissue[j] = np.where(z[j] < zd, T.BOWEL, T.FAT)
    c.tissue[j[np.abs(z[j] - zd) < 4.0]] = T.MUSCLE
    ys_all = s.spine_y(z)

    # muscles around the spine: paraspinal (behind it) and psoas (beside the lumbar spine)
    i = c.box(np.array([-60, -1e3, 90]), np.array([60, 1e3, 700]))
    c.paint(i, (y[i] < ys_all[i] - 8.0) & (rl[i] < 1.0), T.MUSCLE, None)
    i = c.box(np.array([-90, -1e3, 140]), np.array([90, 1e3, 345]))
    below = np.clip(340.0 - z[i], 0.0, None)
    c.paint(i, (np.abs(x[i]) - (30 + 0.12 * below)) ** 2 + (y[i] - ys_all[i] - 5) ** 2 < (8 + 0.1 * below) ** 2,
            T.MUSCLE, None)

    def organ(name: str, tissue: object, diaphragm: float = 0.0) -> None:
        """Paint ellipsoid ``name`` inside the cavity; diaphragm < 0: only below it, > 0: only above."""
        e = s.organs[name]
        i = c.box(*e.bbox())
        if i.size == 0:
            return
        q = c.p[:, i]
        n2 = e.norm2(q)
        m = (n2 < 1.0) & cav[i]
        if diaphragm:
            zd_i = s.diaphragm_z(q[0], q[1])
            m &= (q[2] < zd_i + diaphragm) if diaphragm < 0 else (q[2] > zd_i + diaphragm)
        t = tissue(n2, q) if callable(tissue) else tissue
        c.paint(i, m, t, LABEL_INDEX[name])

    def local_z(name: str, q: np.ndarray) -> np.ndarray:
        e = s.organs[name]
        return e.axes[:, 2].astype(np.float32) @ (q - e.centre[:, None].astype(np.float32))

    organ("liver", T.LIVER, diaphragm=-3.0)
    organ("spleen", T.SPLEEN, diaphragm=-3.0)
    st_top = s.organs["stomach"].r_pos[2] - 20.0
    organ("stomach", lambda n2, q: np.where(n2 > 0.8, T.MUSCLE, np.where(local_z("stomach", q) > st_top, T.AIR,
                                                                             T.FLUID)), diaphragm=-3.0)
    for side in ("left", "right"):
        organ(f"kidney_{side}", lambda n2, q: np.where(n2 > 0.45, T.KIDNEY_CORTEX, T.KIDNEY_MEDULLA))
    organ("bladder", lambda n2, q: np.where(n2 > 0.85, T.MUSCLE, T.URINE))
    for side, sign in (("left", -1.0), ("right", 1.0)):
        e = s.organs[f"lung_{side}"]
        i = c.box(*e.bbox())
        q = c.p[:, i]
        m = (e.norm2(q) < 1.0) & cav[i] & (sign * q[0] > 6.0) & (q[2] > s.diaphragm_z(q[0], q[1]) + 4.0)
        c.paint(i, m, T.LUNG, LABEL_INDEX[f"lung_{side}"])

    # mediastinum between the lungs, then its contents
    i = c.box(np.array([-20, -1e3, 380]), np.array([20, 1e3, 650]))
    q = c.p[:, i]
    c.paint(i, cav[i] & (q[1] > ys_all[i] + 5.0) & (q[2] > s.diaphragm_z(q[0], q[1])), T.FAT, 0)
    _tube(c, s.tubes["oesophagus"], T.MUSCLE, 0)
    for name in ("trachea", "bronchus_left", "bronchus_right"):
        _tube(c, s.tubes[name], T.MUSCLE, 0, grow=2.0)
    for name in ("trachea", "bronchus_left", "bronchus_right"):
        _tube(c, s.tubes[name], T.AIR, 0)
    _tube(c, s.tubes["ivc"], T.VENOUS_BLOOD, 0)
    hx = float(s.organs["heart"].centre[0])
    organ("heart", lambda n2, q: np.where(n2 > 0.6, T.MYOCARDIUM,
                                          np.where(q[0] > hx, T.VENOUS_BLOOD, T.ARTERIAL_BLOOD)), diaphragm=2.0)
    _tube(c, s.tubes["aorta"], T.ARTERIAL_BLOOD, LABEL_INDEX["aorta"])
    _bones(s, c, rl, thr, ys_all)


def _tube(c: _Canvas, tube: Tube, tissue: int, label: int | None, grow: float = 0.0) -> None:
    for a, b, ra, rb in tube.segments():
        r = max(ra, rb) + grow
        i = c.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if i.size:
            c.paint(i, capsule_excess(c.p[:, i], a, b, ra + grow, rb + grow) < 0.0, tissue, label)


def _bones(s: Subject, c: _Canvas, rl: np.ndarray, thr: np.ndarray, ys_all: np.ndarray) -> None:
    """Ribs, sternum, pelvis and femoral heads (unlabelled) and the vertebrae T1..L5 (labelled)."""
    x, y, z = c.p
    rbar = 1.0 - thr  # muscle thickness in normalised radius units
    i = c.box(np.array([-1e3, -1e3, 300]), np.array([1e3, 1e3, 650]))
    phase = z[i] + 0.35 * (y[i] - ys_all[i]) - 380.0
    ribs = ((rl[i] >= thr[i]) & (rl[i] < thr[i] + 0.7 * rbar[i]) & (phase > 0) & (phase < 265)
            & (np.mod(phase, 25.0) < 9.0) & (np.abs(x[i]) > 28.0))
    c.paint(i, ribs, T.CORTICAL_BONE, 0)
    sternum = (np.abs(x[i]) < 16) & (y[i] > 0) & (z[i] > 455) & (z[i] < 615) & (rl[i] > thr[i] - 0.02) & (
        rl[i] < thr[i] + 0.8 * rbar[i])
    c.paint(i, sternum, T.TRABECULAR_BONE, 0)

    vz = s.vertebra_z[::-1]  # L5..T1, increasing z
    vr = s.vertebra_r[::-1]
    zc = vz.mean(axis=1)

    def canal_y(zz: np.ndarray) -> np.ndarray:
        return s.spine_y(zz) - np.interp(zz, zc, vr[:, 1]).astype(np.float32) - 9.0

    i = c.box(np.array([-10, -1e3, 40]), np.array([10, 1e3, 760]))
    c.paint(i, x[i] ** 2 + (y[i] - canal_y(z[i])) ** 2 < 8.5**2, T.CSF, 0)

    # pelvis: sacrum, iliac wings, pubis, femoral heads
    l5_lo = float(vz[0, 0])
    i = c.box(np.array([-60, -1e3, 40]), np.array([60, 1e3, l5_lo - 4]))
    half_w = 48.0 * np.clip((z[i] - 25.0) / 110.0, 0.2, 1.0)
    sac_y = float(s.spine_y(np.float32(l5_lo))) - 0.45 * (l5_lo - z[i])
    c.paint(i, (x[i] / half_w) ** 2 + ((y[i] - sac_y) / 13.0) ** 2 < 1.0, T.TRABECULAR_BONE, 0)
    i = c.box(np.array([-140, -1e3, 95]), np.array([140, 1e3, 215]))
    e = ((np.abs(x[i]) - 62.0) / 70.0) ** 2 + ((y[i] + 8.0) / 52.0) ** 2
    c.paint(i, (e > 0.78) & (e < 1.0) & (y[i] < 25.0) & (np.abs(x[i]) > 25.0), T.CORTICAL_BONE, 0)
    i = c.box(np.array([-60, 68, 25]), np.array([60, 88, 62]))
    c.paint(i, rl[i] < 1.0, T.CORTICAL_BONE, 0)
    for sx in (-90.0, 90.0):
        i = c.box(np.array([sx - 25, -25, 35]), np.array([sx + 25, 25, 85]))
        r2 = ((x[i] - sx) ** 2 + y[i] ** 2 + (z[i] - 60.0) ** 2) / 24.0**2
        c.paint(i, r2 < 1.0, np.where(r2 > 0.7, T.CORTICAL_BONE, T.TRABECULAR_BONE), 0)

    # vertebrae: body (+ disc between bodies), neural arch, transverse and spinous processes
    i = c.box(np.array([-50, -1e3, vz[0, 0] - 15]), np.array([50, 1e3, vz[-1, 1] + 5]))
    xi, yi, zi = x[i], y[i], z[i]
    k = np.minimum(np.searchsorted(vz[:, 1], zi), len(vz) - 1)
    in_z = (zi >= vz[k, 0]) & (zi <= vz[k, 1])
    e = (xi / vr[k, 0]) ** 2 + ((yi - ys_all[i]) / vr[k, 1]) ** 2
    c.paint(i, (e < 1.0) & (zi < vz[k, 0]) & (k > 0), T.DISC, 0)
    yc = canal_y(zi)
    r = np.sqrt(xi**2 + (yi - yc) ** 2)
    k2 = np.minimum(np.searchsorted(vz[:, 1], zi + 10.0), len(vz) - 1)
    in_z2 = (zi + 10.0 >= vz[k2, 0]) & (zi + 10.0 <= vz[k2, 1])
    wing = np.where(k < 5, 45.0, 38.0)
    bone = ((e < 1.0) & in_z) | (in_z & (r > 8.5) & (r < 14.0) & (yi < yc + 6.0))
    bone |= in_z & (np.abs(xi) > 10.0) & (np.abs(xi) < wing) & (np.abs(yi - yc) < 5.0)
    bone |= in_z2 & (np.abs(xi) < 4.0) & (yi < yc - 10.0) & (yi > yc - 42.0)
    c.paint(i, bone, np.where((e > 0.65) | ~in_z | (e > 1.0), T.CORTICAL_BONE, T.TRABECULAR_BONE),
            LABEL_INDEX["vertebrae"])
