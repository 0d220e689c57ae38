"""PCL/GCL positions from a correspondence provider (``contrast.position: affine``): the view centre mapped into
the reference scan, normalised by the reference's body box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volcontrast.data.cache import Cache
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import build_pretraining
from volcontrast.errors import InputError
from volcontrast.spatial.correspondence import get_provider


def _cfg(position: str, **kw):
    over = {"method": "pcl", "steps": 2, "probe_crops": 0, "data": {"crop_size": [16, 16, 16], "workers": 0},
            "contrast": {"position": position, "axes": "xyz"}}
    return resolve_pretrain_config("cpu-tiny", over, kw)


def test_affine_positions_are_the_normalised_reference_coordinates_of_the_view_centres(synth_cache):
    cache = Cache(synth_cache[1])
    method, sampler, _ = build_pretraining(cache, _cfg("affine"))
    raw = {k: torch.as_tensor(v) for k, v in sampler[0].items()}
    with torch.no_grad():
        batch = method.prepare(raw, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    geo = batch["geometry"]
    provider = get_provider("affine", cache)
    lo, hi = provider.reference_box()
    ref = provider.reference
    for i in range(len(geo.case_index)):
        cid = method.table.ids[int(geo.case_index[i])]
        world_ref = provider.to_reference(cid, geo.cached_centre[i].numpy())
        np.testing.assert_allclose(batch["positions"][i].numpy(), (world_ref - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    # the reference scan's own body box maps onto [0, 1]: its centre voxel sits inside
    meta = cache.meta(ref)
    centre = np.array([(a + b - 1) / 2 for a, b in meta.body_bbox], dtype=np.float64)
    p = provider.normalised(ref, centre)
    assert np.all((p > 0.3) & (p < 0.7)), p


def test_unknown_position_kind_is_an_input_error():
    with pytest.raises(InputError) as exc:
        _cfg("nowhere")
    assert str(exc.value).startswith("contrast.position: must be body, index or a correspondence provider (")
