"""Intensity models of the synthetic cohort: tissue classes -> CT (HU) or MR (arbitrary units) images.

CT: a Hounsfield value per tissue and contrast phase (native / arterial / portal-venous), per-case offsets,
smooth texture, mottled bowel with gas, lung vessels, partial-volume blur and slightly correlated noise.
MR (int16, >= 0): per-subject random tissue intensities, a smooth multiplicative bias field, blur and Rician noise
(magnitude of a complex Gaussian).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from volcontrast.data.anatomy import Tissue

T = Tissue
N_TISSUES = len(Tissue)

CT_HU: dict[int, float] = {
    T.AIR: -1000, T.LUNG: -860, T.FAT: -100, T.MUSCLE: 45, T.BOWEL: 25, T.LIVER: 60, T.SPLEEN: 50,
    T.KIDNEY_CORTEX: 35, T.KIDNEY_MEDULLA: 30, T.ARTERIAL_BLOOD: 45, T.VENOUS_BLOOD: 40, T.MYOCARDIUM: 45,
    T.CORTICAL_BONE: 900, T.TRABECULAR_BONE: 260, T.DISC: 80, T.CSF: 15, T.URINE: 8, T.FLUID: 12,
}
CT_CONTRAST: dict[str, dict[int, float]] = {  # enhancement (HU) added per phase
    "native": {},
    "arterial": {T.ARTERIAL_BLOOD: 260, T.VENOUS_BLOOD: 40, T.KIDNEY_CORTEX: 150, T.KIDNEY_MEDULLA: 40,
                 T.LIVER: 15, T.SPLEEN: 70, T.MYOCARDIUM: 50},
    "portal": {T.ARTERIAL_BLOOD: 130, T.VENOUS_BLOOD: 125, T.KIDNEY_CORTEX: 130, T.KIDNEY_MEDULLA: 110,
               T.LIVER: 50, T.SPLEEN: 70, T.MYOCARDIUM: 50},
}
CT_TEXTURE_HU: dict[int, float] = {T.LUNG: 25, T.FAT: 12, T.MUSCLE: 10, T.LIVER: 8, T.SPLEEN: 8,
                                   T.TRABECULAR_BONE: 40, T.KIDNEY_CORTEX: 8, T.KIDNEY_MEDULLA: 8}


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """Gaussian-filtered white noise (float32, unit std) with correlation length ``sigma_mm``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, [sigma_mm / s for s in spacing], mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _lut(values: dict[int, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(N_TISSUES, default, np.float32)
    for k, v in values.items():
        lut[int(k)] = v
    return lut


def _pve(image: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Partial-volume blur: Gaussian with sigma of 0.45 voxel plus 0.8 mm, per axis."""
    return ndimage.gaussian_filter(image, [0.45 + 0.8 / s for s in spacing], mode="nearest")


def ct_image(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
             ) -> tuple[np.ndarray, dict[str, object]]:
    """CT image (X, Y, Z) int16 HU from a tissue map (X, Y, Z) uint8 with voxel ``spacing`` (mm)."""
    phase = str(rng.choice(list(CT_CONTRAST), p=[0.3, 0.3, 0.4]))
    hu = _lut(CT_HU)
    for k, v in CT_CONTRAST[phase].items():
        hu[int(k)] += v
    hu[1:] += rng.normal(0.0, 6.0, N_TISSUES - 1).astype(np.float32)
    image = hu[tissue]
    texture = smooth_noise(rng, tissue.shape, 2.5, spacing)
    image += _lut(CT_TEXTURE_HU)[tissue] * texture
    lung = tissue == T.LUNG
    image[lung & (texture > 1.9)] += 450.0  # vessels
    bowel = tissue == T.BOWEL
    if bowel.any():
        mix = smooth_noise(rng, tissue.shape, 7.0, spacing)[bowel]
        image[bowel] = np.where(mix > 1.9, -950.0, -100.0 + 150.0 / (1.0 + np.exp(-2.5 * (mix - 0.3))))
    image = _pve(image, spacing)
    sigma = rng.uniform(8.0, 28.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, dtype=np.float32), 0.6)
    image += sigma * noise / max(float(noise.std()), 1e-6)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image, {"contrast_phase": phase, "noise_hu": round(float(sigma), 3)}


def mr_image(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
             ) -> tuple[np.ndarray, dict[str, object]]:
    """MR-like image (X, Y, Z) int16 (>= 0, mostly < 1500, like scanner output) from a tissue map.

    Random intensity per tissue, multiplicative bias field exp(quadratic polynomial), Rician noise.
    """
    level = rng.uniform(100.0, 1000.0, N_TISSUES).astype(np.float32)
    level[T.AIR] = 0.0
    level[T.LUNG] = rng.uniform(0.0, 60.0)
    level[T.CORTICAL_BONE] = rng.uniform(0.0, 80.0)
    level[T.FAT] = rng.uniform(400.0, 1000.0)
    image = level[tissue]
    image *= 1.0 + 0.05 * smooth_noise(rng, tissue.shape, 2.5, spacing)
    bowel = tissue == T.BOWEL
    if bowel.any():
        mix = smooth_noise(rng, tissue.shape, 7.0, spacing)[bowel]
        fat_share = 1.0 / (1.0 + np.exp(2.5 * (mix - 0.3)))
        image[bowel] = np.where(mix > 1.9, 0.0, level[T.BOWEL] + (level[T.FAT] - level[T.BOWEL]) * fat_share)
    image = _pve(image, spacing)
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in tissue.shape], indexing="ij",
                        sparse=True)
    coef = rng.normal(0.0, 0.15, 9)
    log_bias = (coef[0] * grids[0] + coef[1] * grids[1] + coef[2] * grids[2] + coef[3] * grids[0] * grids[1]
                + coef[4] * grids[1] * grids[2] + coef[5] * grids[0] * grids[2] + coef[6] * grids[0] ** 2
                + coef[7] * grids[1] ** 2 + coef[8] * grids[2] ** 2)
    image *= np.exp(log_bias).astype(np.float32)
    sigma = float(rng.uniform(10.0, 40.0))
    real = image + sigma * rng.standard_normal(tissue.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(tissue.shape, dtype=np.float32)
    image = np.clip(np.rint(np.sqrt(real * real + imag * imag)), 0, 32767).astype(np.int16)
    return image, {"noise_sigma": round(sigma, 3), "bias_coefficients": [round(float(c), 4) for c in coef]}
