"""``preview.png`` of a cohort: axial and coronal slices of the first cases with the labels overlaid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from volcontrast.io import load_volume


def _window(image: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return -400.0, 500.0
    lo, hi = np.percentile(image, [1.0, 99.5])
    return float(lo), float(hi)


def write_preview(root: str | Path, path: str | Path, max_cases: int = 4) -> Path:
    """Montage (matplotlib Agg) of up to ``max_cases`` cases of the nnU-Net raw dataset at ``root``.

    Slices are taken in canonical RAS+ orientation through the median labelled voxel and shown in
    radiological convention (patient right on the left of the image, anterior and superior up), in mm.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    root, path = Path(root), Path(path)
    meta = json.loads((root / "dataset.json").read_text())
    names = [n for n, v in sorted(meta["labels"].items(), key=lambda kv: kv[1]) if v > 0]
    modality = meta["channel_names"]["0"]
    labels = sorted((root / "labelsTr").glob(f"*{meta['file_ending']}"))[:max_cases]
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: len(names)]
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 8.0), squeeze=False)
    for col, label_path in enumerate(labels):
        case = label_path.name[: -len(meta["file_ending"])]
        image = load_volume(root / "imagesTr" / f"{case}_0000{meta['file_ending']}")
        label = load_volume(label_path, label=True).array
        sx, sy, sz = image.spacing
        fg = np.argwhere(label > 0)
        cy, cz = (np.median(fg[:, 1:], axis=0).astype(int) if len(fg) else np.array(label.shape[1:]) // 2)
        lo, hi = _window(image.array, modality)
        nx, ny, nz = label.shape
        views = (("axial", image.array[:, :, cz], label[:, :, cz], (nx * sx, ny * sy)),
                 ("coronal", image.array[:, cy, :], label[:, cy, :], (nx * sx, nz * sz)))
        for row, (view, img, lab, (width, height)) in enumerate(views):
            ax = axes[row, col]
            extent = (0.0, width, 0.0, height)
            ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            overlay = np.ma.masked_equal(lab.T.astype(float), 0)
            ax.imshow(overlay - 1, origin="lower", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, alpha=0.45,
                      extent=extent, interpolation="nearest")
            ax.invert_xaxis()  # radiological convention: patient right on the left of the image
            ax.set_title(f"{case} {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        info = root / "landmarks" / f"{case}.json"
        if info.exists():
            acq = json.loads(info.read_text()).get("acquisition", {})
            axes[1, col].set_xlabel(f"{acq.get('protocol', '')}, stored {acq.get('axcodes', '')}\n"
                                    f"{sx:.1f}x{sy:.1f}x{sz:.1f} mm", fontsize=8)
    handles = [Patch(color=colours[i], label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.suptitle(f"volcontrast synthetic cohort ({modality})", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
