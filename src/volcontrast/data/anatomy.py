"""A parametric torso for the synthetic cohort: one random subject, rendered at any points.

Frames (all in mm, axes towards patient Right, Anterior, Superior as in RAS+ world space):

* **atlas**: the standard torso. ``z = 0`` is the pelvic floor, the body runs from ``z = -20`` (bottom of
  the rounded pelvic cap) to ``z = 760`` (neck cut); ``x = 0`` is the midline, ``y = 0`` the centre of the
  lean body. The subject's organs are described here (jittered per subject).
* **subject**: the atlas pulled back through a smooth random deformation, ``atlas = s + u(s)``; the
  displacement ``u`` is a band-limited random field (a few random plane waves per component, wavelengths
  140-350 mm, rms ~4 mm, gradient norm < 0.35 per component), exact and cheap to evaluate anywhere, so
  :meth:`Subject.atlas_to_subject` inverts it by fixed-point iteration to < 1e-4 mm.
* world = ``R @ diag(scale) @ (s - pivot) + t`` is chosen by the acquisition (``synth.py``).

:func:`render` maps atlas points to a label (:data:`LABELS`, 1-based) and a tissue class (:class:`Tissue`).
Later structures overwrite earlier ones, so the label is a single function of the atlas position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator

LABELS: tuple[str, ...] = (
    "lung_left", "lung_right", "heart", "aorta", "liver", "spleen",
    "kidney_left", "kidney_right", "stomach", "bladder", "vertebrae",
)
LABEL_INDEX: dict[str, int] = {name: i + 1 for i, name in enumerate(LABELS)}
VERTEBRAE: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
BODY_Z = (-20.0, 760.0)  # atlas z-extent of the body (mm)


class Tissue(IntEnum):
    """Tissue classes of the rendered torso (intensities are assigned per modality in synth.py)."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    BOWEL = 4
    LIVER = 5
    SPLEEN = 6
    KIDNEY_CORTEX = 7
    KIDNEY_MEDULLA = 8
    ARTERIAL_BLOOD = 9
    VENOUS_BLOOD = 10
    MYOCARDIUM = 11
    CORTICAL_BONE = 12
    TRABECULAR_BONE = 13
    DISC = 14
    CSF = 15
    URINE = 16
    FLUID = 17


# lean body profile along z: half-width a, half-depth b (mm); fat is added outside
_PROFILE = np.array([
    (-20, 155, 100), (0, 155, 100), (60, 162, 105), (160, 152, 98), (260, 135, 92), (360, 140, 100),
    (460, 150, 106), (560, 158, 105), (615, 166, 98), (650, 146, 85), (672, 80, 58), (690, 50, 48),
    (760, 46, 46),
], dtype=np.float64)
_SPINE_DEPTH = np.array([(0, 72), (150, 70), (330, 66), (500, 62), (640, 58), (700, 40), (760, 36)], float)
_ZT = np.arange(-30.0, 812.0, 2.0)  # z grid (mm) of the per-subject lookup tables
_P = 2.3  # superellipse exponent of the body cross-section


def rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    """(3, 3) rotation ``Rz @ Ry @ Rx`` from angles in degrees."""
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with separate radii towards + and - of each local axis (smooth, egg-like shapes).

    ``axes`` columns are the local axes in atlas coordinates; radii in mm.
    """

    centre: np.ndarray
    r_pos: np.ndarray
    r_neg: np.ndarray
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))

    def norm2(self, p: np.ndarray) -> np.ndarray:
        """``sum((d / r)^2)`` for points ``p`` (3, N) atlas mm; < 1 inside."""
        d = self.axes.T.astype(np.float32) @ (p - self.centre[:, None].astype(np.float32))
        r = np.where(d > 0, self.r_pos[:, None], self.r_neg[:, None]).astype(np.float32)
        return ((d / r) ** 2).sum(axis=0)

    def point(self, local: tuple[float, float, float]) -> np.ndarray:
        """Atlas position (3,) of a point given in local mm coordinates."""
        return self.centre + self.axes @ np.asarray(local, float)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(max(self.r_pos.max(), self.r_neg.max()))
        return self.centre - r, self.centre + r


@dataclass(frozen=True)
class Tube:
    """A polyline tube: centreline ``points`` (K, 3) atlas mm with radii (K,) mm linearly interpolated.

    The tube is the union of its K-1 capsules (cone frusta with round ends).
    """

    points: np.ndarray
    radii: np.ndarray

    def segments(self) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
        """``(start, end, r_start, r_end)`` of each capsule."""
        p, r = self.points, self.radii
        return [(p[i], p[i + 1], float(r[i]), float(r[i + 1])) for i in range(len(p) - 1)]

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(0) - r, self.points.max(0) + r

    def at_height(self, z: float) -> np.ndarray:
        """Centreline point (3,) at atlas height ``z`` on the last monotone (descending) part of the path."""
        zs = self.points[:, 2]
        start = int(np.argmax(zs))
        tail = self.points[start:][::-1]  # increasing z
        return np.array([np.interp(z, tail[:, 2], tail[:, i]) for i in range(3)])


def capsule_excess(p: np.ndarray, a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    """Distance (N,) mm from points ``p`` (3, N) to segment ``a``-``b`` minus the interpolated radius."""
    a32, d = a.astype(np.float32)[:, None], (b - a).astype(np.float32)[:, None]
    rel = p - a32
    t = np.clip((rel * d).sum(0) / max(float((d * d).sum()), 1e-9), 0.0, 1.0)
    dist = np.sqrt(((rel - t * d) ** 2).sum(0))
    return dist - (ra + t * (rb - ra))


def smooth_path(control: list[tuple[float, float, float]], n: int = 32) -> np.ndarray:
    """``n`` points (n, 3) on a cubic spline through ``control`` points, by chord length."""
    c = np.asarray(control, float)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(c, axis=0), axis=1))])
    return CubicSpline(s, c, axis=0, bc_type="natural")(np.linspace(0.0, s[-1], n))


@dataclass
class Subject:
    """One random subject: shape tables, organs, tubes, spine and its smooth deformation (all atlas mm)."""

    scale: np.ndarray  # (3,) body size factors (lateral, AP, length) applied in world
    fat_mm: float
    muscle_mm: float
    a_lean: np.ndarray  # tables on _ZT: lean half-width, half-depth, fat thickness, spine y
    b_lean: np.ndarray
    fat: np.ndarray
    spine_y_table: np.ndarray
    diaphragm: tuple[float, float, float]  # base z, right dome height, left dome height
    organs: dict[str, Ellipsoid]
    tubes: dict[str, Tube]
    vertebra_z: np.ndarray  # (17, 2) body z-range of each vertebral body, T1..L5
    vertebra_r: np.ndarray  # (17, 2) half-width, half-depth of each vertebral body
    wave_k: np.ndarray  # (3, M, 3) wave vectors (rad/mm) per displacement component
    wave_amp: np.ndarray  # (3, M) mm
    wave_phase: np.ndarray  # (3, M) rad

    # ------------------------------------------------------------------ geometry helpers
    def spine_y(self, z: np.ndarray) -> np.ndarray:
        """y (mm) of the vertebral-body centreline at atlas heights ``z``."""
        return np.interp(z, _ZT, self.spine_y_table).astype(np.float32)

    def diaphragm_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the diaphragm surface above (x, y): two domes, lower posteriorly."""
        base, h_right, h_left = self.diaphragm
        s2 = 2.0 * 45.0**2
        yy = (y - 5.0) ** 2
        return (base + 0.28 * y + h_right * np.exp(-((x - 58.0) ** 2 + yy) / s2)
                + h_left * np.exp(-((x + 58.0) ** 2 + yy) / s2)).astype(np.float32)

    def displacement(self, s: np.ndarray) -> np.ndarray:
        """Smooth displacement ``u(s)`` (3, N) mm at subject-frame points ``s`` (3, N) mm."""
        s32 = np.asarray(s, np.float32)
        out = np.zeros_like(s32)
        for c in range(3):
            for m in range(self.wave_amp.shape[1]):
                k = self.wave_k[c, m].astype(np.float32)
                phase = k[0] * s32[0] + k[1] * s32[1] + k[2] * s32[2] + np.float32(self.wave_phase[c, m])
                out[c] += np.float32(self.wave_amp[c, m]) * np.sin(phase)
        return out

    def max_displacement(self) -> float:
        """An upper bound (mm) on ``|u|`` per component."""
        return float(np.abs(self.wave_amp).sum(axis=1).max())

    def subject_to_atlas(self, s: np.ndarray) -> np.ndarray:
        """Atlas positions (3, N) of subject-frame points (3, N)."""
        return np.asarray(s, np.float32) + self.displacement(s)

    def atlas_to_subject(self, a: np.ndarray, tol: float = 1e-4, max_iter: int = 100) -> np.ndarray:
        """Invert ``a = s + u(s)`` by fixed-point iteration ``s <- a - u(s)`` (float64), (3, N) mm."""
        a = np.asarray(a, np.float64)
        s = a.copy()
        for _ in range(max_iter):
            s_new = a - self.displacement_exact(s)
            if np.abs(s_new - s).max() < tol * 0.1:
                return s_new
            s = s_new
        raise RuntimeError("displacement inversion did not converge")  # cannot happen: |grad u| < 1

    def displacement_exact(self, s: np.ndarray) -> np.ndarray:
        """``u(s)`` (3, N) mm in float64 (used for the landmark inversion)."""
        phase = np.einsum("cmk,kn->cmn", self.wave_k, s) + self.wave_phase[..., None]
        return (self.wave_amp[..., None] * np.sin(phase)).sum(axis=1)

    def structure_bbox(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Conservative atlas box (lo, hi) of labelled structure ``name``."""
        if name in self.organs:
            return self.organs[name].bbox()
        if name in self.tubes:
            return self.tubes[name].bbox()
        if name == "vertebrae":
            z0, z1 = float(self.vertebra_z.min()) - 15.0, float(self.vertebra_z.max()) + 5.0
            ys = self.spine_y(np.array([z0, z1]))
            return np.array([-50.0, float(ys.min()) - 75.0, z0]), np.array([50.0, float(ys.max()) + 30.0, z1])
        raise KeyError(name)

    def body_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Atlas box (lo, hi) that contains the whole body."""
        half_w = float((self.a_lean + self.fat).max())
        half_d = float((self.b_lean + self.fat).max())
        return np.array([-half_w, -half_d, BODY_Z[0]]), np.array([half_w, half_d, BODY_Z[1]])

    def vertebra_centres(self) -> np.ndarray:
        """(17, 3) atlas centres of the vertebral bodies T1..L5."""
        zc = self.vertebra_z.mean(axis=1)
        return np.stack([np.zeros_like(zc), self.spine_y(zc).astype(float), zc], axis=1)

    def point_landmarks(self) -> dict[str, tuple[np.ndarray, str | None]]:
        """Material landmarks: name -> (atlas position (3,) mm, structure it lies in or None)."""
        o, t = self.organs, self.tubes
        out: dict[str, tuple[np.ndarray, str | None]] = {}
        for side in ("left", "right"):
            lung = o[f"lung_{side}"]
            cx, cy = float(lung.centre[0]), float(lung.centre[1])
            out[f"lung_{side}_apex"] = (lung.point((0, 0, lung.r_pos[2] - 8)), f"lung_{side}")
            base = np.array([cx, cy, float(self.diaphragm_z(np.float32(cx), np.float32(cy))) + 14.0])
            out[f"lung_{side}_base"] = (base, f"lung_{side}")
        for side in ("left", "right"):
            k = o[f"kidney_{side}"]
            out[f"kidney_{side}_upper_pole"] = (k.point((0, 0, k.r_pos[2] - 5)), f"kidney_{side}")
            out[f"kidney_{side}_lower_pole"] = (k.point((0, 0, -(k.r_neg[2] - 5))), f"kidney_{side}")
        dome_z = float(self.diaphragm_z(np.float32(58.0), np.float32(5.0)))
        out["liver_dome"] = (np.array([58.0, 5.0, dome_z - 10.0]), "liver")
        out["liver_inferior_tip"] = (o["liver"].point((0, 0, -(o["liver"].r_neg[2] - 8))), "liver")
        out["spleen_inferior_tip"] = (o["spleen"].point((0, 0, -(o["spleen"].r_neg[2] - 6))), "spleen")
        out["heart_apex"] = (o["heart"].point((o["heart"].r_pos[0] - 12, 0, 0)), "heart")
        out["carina"] = (t["trachea"].points[-1] + np.array([0.0, 0.0, 4.0]), None)
        aorta = t["aorta"].points
        zc = self.vertebra_z.mean(axis=1)
        out["aorta_root"] = (aorta[1], "aorta")
        out["aorta_arch_top"] = (aorta[int(np.argmax(aorta[:, 2]))], "aorta")
        out["aorta_at_T8"] = (t["aorta"].at_height(float(zc[7])), "aorta")
        out["aorta_hiatus_T12"] = (t["aorta"].at_height(float(zc[11])), "aorta")
        out["aorta_at_L2"] = (t["aorta"].at_height(float(zc[13])), "aorta")
        out["aorta_bifurcation"] = (aorta[-2], "aorta")
        out["pubic_symphysis"] = (np.array([0.0, 78.0, 44.0]), None)
        for name, centre in zip(VERTEBRAE, self.vertebra_centres(), strict=True):
            out[f"vertebra_{name}"] = (centre, "vertebrae")
        return out


# ---------------------------------------------------------------------------------------------- sampling
def sample_subject(rng: np.random.Generator) -> Subject:
    """Draw one subject: body habitus, organ positions/sizes/rotations, spine, vessels, deformation."""
    u = rng.uniform
    scale = np.array([u(0.9, 1.1), u(0.9, 1.1), u(0.92, 1.08)])
    lean = PchipInterpolator(_PROFILE[:, 0], _PROFILE[:, 1:], axis=0)(_ZT.clip(-20, 760))
    belly, chest = u(-0.05, 0.15), u(-0.05, 0.06)
    a_lean = lean[:, 0] * (1 + chest * np.exp(-(((_ZT - 540) / 110) ** 2)))
    b_lean = lean[:, 1] * (1 + belly * np.exp(-(((_ZT - 270) / 120) ** 2)))
    fat_mm, muscle_mm = float(6 + 34 * u() ** 1.5), u(10.0, 17.0)
    fat = fat_mm * (0.45 + 0.55 * np.clip((700 - _ZT) / 50, 0, 1))  # thinner on the neck
    spine_y = -b_lean + np.interp(_ZT, _SPINE_DEPTH[:, 0], _SPINE_DEPTH[:, 1]) + rng.normal(0, 3)

    dz = float(np.clip(rng.normal(0, 9), -22, 22))  # breath-hold level moves diaphragm and upper abdomen
    diaphragm = (418.0 + dz, 68 * u(0.85, 1.15), 56 * u(0.85, 1.15))

    def jit(centre, r_pos, r_neg, rot=(0.0, 0.0, 0.0), sd=5.0, size=0.1, ang=5.0) -> Ellipsoid:
        c = np.asarray(centre, float) + np.clip(rng.normal(0, sd, 3), -2.5 * sd, 2.5 * sd)
        f = u(1 - size, 1 + size) * u(0.95, 1.05, 3)
        axes = rotation(*(np.asarray(rot) + rng.normal(0, ang / 2, 3).clip(-ang, ang)))
        return Ellipsoid(c, np.asarray(r_pos, float) * f, np.asarray(r_neg, float) * f, axes)

    organs = {
        "liver": jit((50, 5, 425 + dz), (112, 88, 80), (98, 85, 95)),
        "spleen": jit((-88, -38, 418 + dz), (26, 55, 48), (24, 48, 44), rot=(0, 0, 35)),
        "stomach": jit((-45, 32, 412 + dz), (40, 45, 55), (45, 40, 58), rot=(0, 20, 0)),
        "kidney_left": jit((-70, -36, 300 + 0.5 * dz), (27, 24, 55), (27, 24, 55), rot=(-10, -15, 0)),
        "kidney_right": jit((70, -36, 284 + 0.5 * dz), (27, 24, 55), (27, 24, 55), rot=(-10, 15, 0)),
        "bladder": jit((0, 36, 72), (46, 38, 40), (46, 38, 34), size=0.25),
        "heart": _heart(rng, dz),
        "lung_right": jit((78, -5, 520), (90, 100, 115), (70, 100, 150), sd=3.0, size=0.04, ang=0.0),
        "lung_left": jit((-78, -5, 520), (70, 100, 115), (90, 100, 150), sd=3.0, size=0.04, ang=0.0),
    }
    # spine: T1..L5 bodies from the top of L5 downwards (lumbar pitch 38 mm, thoracic 31 -> 22 mm)
    f_spine = u(0.96, 1.04)
    pitch = np.concatenate([np.linspace(22, 31, 12), np.full(5, 38.0)]) * f_spine
    height = np.concatenate([np.linspace(17, 25, 12), np.full(5, 28.0)]) * f_spine
    bottom = 150.0 + rng.normal(0, 4)
    tops = bottom + np.cumsum(pitch[::-1])[::-1] - (pitch - height)  # body top of each vertebra
    vertebra_z = np.stack([tops - height, tops], axis=1)
    vertebra_r = np.stack([np.concatenate([np.linspace(14, 21, 12), np.linspace(23, 25, 5)]),
                           np.concatenate([np.linspace(11, 16, 12), np.linspace(16, 18, 5)])], axis=1)
    tubes = _tubes(rng, spine_y)

    n_waves = 6
    direction = rng.normal(size=(3, n_waves, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    wave_k = direction * (2 * np.pi / rng.uniform(140, 350, (3, n_waves, 1)))
    amp = rng.normal(0, 4.0 * np.sqrt(2.0 / n_waves), (3, n_waves))
    lipschitz = (np.abs(amp) * np.linalg.norm(wave_k, axis=-1)).sum(axis=1, keepdims=True)
    amp *= np.minimum(1.0, 0.35 / lipschitz)  # keeps the deformation invertible (contraction)
    return Subject(scale, fat_mm, muscle_mm, a_lean, b_lean, fat, spine_y, diaphragm, organs, tubes,
                   vertebra_z, vertebra_r, wave_k, amp, rng.uniform(0, 2 * np.pi, (3, n_waves)))


def _heart(rng: np.random.Generator, dz: float) -> Ellipsoid:
    """Heart: long axis from base (right, posterior, superior) to apex (left, anterior, inferior)."""
    apex = np.array([-0.67, 0.5, -0.5]) + rng.normal(0, 0.06, 3)
    apex /= np.linalg.norm(apex)
    side = np.cross([0.0, 0.0, 1.0], apex)
    side /= np.linalg.norm(side)
    axes = np.stack([apex, side, np.cross(apex, side)], axis=1)
    centre = np.array([-15.0, 25.0, 518.0 + 0.5 * dz]) + np.clip(rng.normal(0, 5, 3), -12, 12)
    f = rng.uniform(0.9, 1.1)
    return Ellipsoid(centre, np.array([70.0, 48, 45]) * f, np.array([52.0, 48, 45]) * f, axes)


def _tubes(rng: np.random.Generator, spine_y: np.ndarray) -> dict[str, Tube]:
    """Aorta (root, arch, descending to the bifurcation), IVC, oesophagus, trachea and main bronchi."""

    def ys(z: float) -> float:
        return float(np.interp(z, _ZT, spine_y))

    aorta = [(0, 22, 528), (12, 30, 565), (2, 32, 598), (-22, 15, 606), (-28, -12, 592), (-24, ys(565) + 20, 565),
             (-24, ys(500) + 22, 500), (-18, ys(420) + 25, 420), (-9, ys(350) + 28, 350), (-5, ys(280) + 28, 280),
             (-3, ys(205) + 25, 205)]
    aorta_path = smooth_path([np.add(p, rng.normal(0, 2.5, 3)) for p in aorta], 40)
    tubes = {
        "aorta": Tube(aorta_path, np.linspace(14.5, 9.0, 40) * rng.uniform(0.9, 1.1)),
        "ivc": Tube(smooth_path([(18, ys(z) + 26, z) for z in (200, 300, 400)] + [(16, 12, 470), (10, 16, 500)], 16),
                    np.full(16, 11.0)),
        "oesophagus": Tube(smooth_path([(-2, ys(z) + 24, z) for z in (760, 640, 560, 500)] + [(-20, 20, 455)], 16),
                           np.full(16, 7.5)),
        "trachea": Tube(np.array([(0, ys(760) + 42, 760), (0, ys(640) + 44, 640), (0, ys(552) + 44, 552)]),
                        np.full(3, 10.0)),
    }
    carina = tubes["trachea"].points[-1]
    tubes["bronchus_right"] = Tube(np.stack([carina, carina + np.array([40.0, -6.0, -38.0])]), np.array([8.0, 6.5]))
    tubes["bronchus_left"] = Tube(np.stack([carina, carina + np.array([-48.0, -6.0, -30.0])]), np.array([8.0, 6.5]))
    return tubes
