"""volcontrast: contrastive pretraining with spatial priors for 3D CT/MR segmentation."""

from __future__ import annotations

__version__ = "0.1.0"

from volcontrast.errors import InputError

__all__ = ["InputError", "__version__"]
