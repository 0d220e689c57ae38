"""Spade: spatially debiased global + local contrast (METHODS.md §2 — our interpretation of the paper).

The paper's full text was not available to us; this follows its abstract and method figure,
and every choice is a field of :class:`SpadeConfig` (the ``spade:`` config section).

Per item (a box cut from a cached scan) two **overlapping** views: centres shifted apart
(:func:`~volcontrast.views.overlap.pair_shifts`, at least ``min_overlap`` of a crop shared), independent
flip/rotation/zoom (recorded, invertible) and intensity augmentation; the pre-intensity views are kept as
restoration targets. An online encoder-decoder and its momentum copy (EMA, cosine ``momentum`` ->
``momentum_end``) see both views.

- **Global** (invariant): GAP of the deepest encoder stage -> MLP -> ``global_dim``. Anchor = online view;
  keys = momentum embeddings of every view of the (DDP-gathered) batch and a queue of past keys, each with the
  reference-frame centre of its crop (correspondence provider, :mod:`volcontrast.spatial.correspondence`).
  The anchor's other view is the positive; keys at distance ``d < r_friend`` are soft positives
  (``exp(-d²/2σ²)``), ``r_friend <= d < r_enemy`` are excluded, ``d >= r_enemy`` are negatives
  (:func:`~volcontrast.spatial.masks.friend_enemy_masks`).
- **Local** (equivariant): decoder features (``local_stage``) of both views read at voxels of their overlap
  (``local_points`` per step, spread over the pairs, so the cost does not grow with the batch), mapped from
  view 1 into view 2 with ``T_2⁻¹ T_1`` (:mod:`volcontrast.views.overlap`), then a pointwise MLP ->
  ``local_dim``. Positive = the same voxel in the other view (momentum key); negatives = the other sampled
  voxels of this rank's batch and a local queue, excluding any whose reference-frame distance to the anchor
  voxel is below ``r_local`` (the same anatomy in another scan is not an enemy).
- **Restoration**: a 1×1×1 conv on the online full-resolution decoder features predicts the view before
  intensity augmentation; MSE.

Loss = ``global_weight``·L_global + ``local_weight``·L_local + ``restore_weight``·L_mse; a weight of 0 removes
its branch (and its parameters). ``debias=False`` (``--no-debias``, method ``spade-nodebias``) sets every
radius to 0: plain MoCo-style global contrast and dense local contrast, the ablation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volcontrast import dist
from volcontrast.errors import InputError
from volcontrast.losses.distill import cosine_schedule
from volcontrast.losses.info_nce import info_nce
from volcontrast.losses.queue import MemoryQueue
from volcontrast.methods.base import PretrainMethod, ema_update
from volcontrast.methods.monitors import ContrastiveCollapse, Monitor
from volcontrast.methods.registry import register_method
from volcontrast.nets.base import Backbone
from volcontrast.nets.heads import GlobalProjectionHead, ProjectionHead, ReconstructionHead, mlp_blocks
from volcontrast.spatial.masks import friend_enemy_masks, simclr_positive_mask, view_item_ids
from volcontrast.views.augment import augment
from volcontrast.views.geometry import CaseTable, view_geometry
from volcontrast.views.overlap import apply_maps, overlap_points, pair_shifts, sample_at

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig

# Spade's distance radii per correspondence provider (its units): r_friend, r_enemy, r_local
SPADE_RADII: dict[str, tuple[float, float, float]] = {
    "body": (0.05, 0.2, 0.03),  # fractions of the body box per axis
    "index": (0.05, 0.2, 0.03),  # fractions of the whole scan per axis
    "affine": (15.0, 60.0, 8.0),  # mm of the reference scan
}


@dataclass
class SpadeConfig:
    """Spade (METHODS.md section 2; our interpretation of the paper). Radii are in the provider's units
    (:data:`SPADE_RADII`); ``None`` takes the provider's default."""

    provider: str = "body"  # correspondence provider: body | affine | index (or a registered one)
    debias: bool = True  # False: plain MoCo-style global + dense local contrast (the ablation)
    min_overlap: float = 0.3  # each view pair overlaps by at least this fraction of a crop (before scaling)
    momentum: float = 0.99  # momentum encoder, cosine schedule to momentum_end over the run
    momentum_end: float = 0.999
    global_weight: float = 1.0  # lambda_g (0 = no global branch)
    global_dim: int = 128
    global_hidden: int = 0  # 0 = the encoder's deepest width
    global_batch_norm: bool = True  # BN in the head's hidden layer (keeps instance-normed encoders from collapsing)
    global_temperature: float = 0.2
    global_queue: int = 8192
    r_friend: float | None = None  # queue/batch keys nearer than this are soft positives
    r_enemy: float | None = None  # keys at least this far are negatives; in between: excluded
    friend_sigma: float = 0.0  # soft-positive weight exp(-d^2 / 2 sigma^2); 0 = r_friend / 2
    local_weight: float = 1.0  # lambda_l (0 = no local branch)
    local_dim: int = 64
    local_temperature: float = 0.2
    local_points: int = 1024  # overlap voxels per step (per rank), spread evenly over the view pairs
    local_queue: int = 16384
    local_enqueue: int = 256  # local keys pushed into the queue per step (per rank)
    r_local: float | None = None  # local negatives nearer than this to the anchor voxel are excluded
    local_stage: int = -1  # decoder stage of the local features (-1 = full resolution, -2 = half, ...)
    restore_weight: float = 1.0  # lambda_r (0 = no restoration head)

    def radii(self) -> tuple[float, float, float]:
        """(r_friend, r_enemy, r_local) with provider defaults filled in; all 0 without debiasing."""
        if not self.debias:
            return 0.0, 0.0, 0.0
        default = SPADE_RADII.get(self.provider, SPADE_RADII["body"])
        given = (self.r_friend, self.r_enemy, self.r_local)
        return tuple(float(d if g is None else g) for g, d in zip(given, default))  # type: ignore[return-value]


__all__ = ["SPADE_RADII", "Spade", "SpadeConfig", "SpadeNoDebias", "spade_global_masks"]


def spade_global_masks(item_ids: Tensor, ref: Tensor, queue_ref: Tensor | None, r_friend: float, r_enemy: float,
                       sigma: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Global masks over the gathered batch and the queue.

    Returns ``(positive weights (M, M), exclude (M, M), queue weights (M, Q), queue exclude (M, Q))``: the
    other views of an item are positives (weight 1, never excluded); every other key gets the friend / excluded
    / enemy rule of its reference-frame distance.
    """
    same = simclr_positive_mask(item_ids)
    w, ex = friend_enemy_masks(ref, ref, r_friend, r_enemy, sigma)
    pos = torch.where(same, torch.ones_like(w), w)
    ex = ex & ~same
    if queue_ref is None:
        return pos, ex, None, None
    qw, qex = friend_enemy_masks(ref, queue_ref, r_friend, r_enemy, sigma)
    return pos, ex, qw, qex


class Spade(PretrainMethod):
    name = "spade"

    @property
    def uses_decoder(self) -> bool:  # type: ignore[override]
        sp = self.config.spade
        return sp.local_weight > 0 or sp.restore_weight > 0

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        sp = config.spade
        if config.dim != 3:
            raise InputError("--dim", "spade works on 3D crops only")
        if not 0.0 < sp.min_overlap <= 1.0:
            raise InputError("spade.min_overlap", f"must be in (0, 1], got {sp.min_overlap}")
        r_friend, r_enemy, r_local = sp.radii()
        if r_friend < 0 or r_enemy < r_friend or r_local < 0:
            raise InputError("spade", f"need 0 <= r_friend <= r_enemy and r_local >= 0, got "
                                      f"{r_friend}, {r_enemy}, {r_local}")
        if sp.global_weight <= 0 and sp.local_weight <= 0 and sp.restore_weight <= 0:
            raise InputError("spade", "every loss weight is 0; enable global, local or restore")

    def monitors(self) -> list[Monitor]:
        return [ContrastiveCollapse()] if self.config.spade.global_weight > 0 else []

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__(backbone, config, table)
        sp = config.spade
        if backbone.dim != 3:
            raise InputError("--dim", "spade works on 3D crops only")
        backbone.seg_head.requires_grad_(False)  # never used in pretraining
        self.r_friend, self.r_enemy, self.r_local = sp.radii()
        width = backbone.encoder_channels[-1]
        online: dict[str, nn.Module] = {"backbone": backbone}
        if sp.global_weight > 0:
            self.global_head = GlobalProjectionHead(width, out_dim=sp.global_dim, hidden_dim=sp.global_hidden or width,
                                                    batch_norm=sp.global_batch_norm)
            self.global_queue = MemoryQueue(sp.global_queue, sp.global_dim, meta={"ref": (3,)})
            online["global_head"] = self.global_head
        if sp.local_weight > 0:
            n_stages = len(backbone.decoder_channels)
            if not -n_stages <= sp.local_stage < n_stages:
                raise InputError("spade.local_stage", f"the backbone has {n_stages} decoder stages")
            c = backbone.decoder_channels[sp.local_stage]
            self.local_head = ProjectionHead(mlp_blocks(c, c, sp.local_dim, 2), dim=0)
            self.local_queue = MemoryQueue(sp.local_queue, sp.local_dim, meta={"ref": (3,)})
            online["local_head"] = self.local_head
        if sp.restore_weight > 0:
            self.restore_head = ReconstructionHead(backbone.decoder_channels[-1], backbone.in_channels, dim=3)
        self.momentum = nn.ModuleDict({k: copy.deepcopy(v) for k, v in online.items()})
        self.momentum.requires_grad_(False)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self._provider = self.fit_provider(sp.provider)

    # ------------------------------------------------------------------------------- correspondence
    def to_reference(self, case_index: Tensor, cached: Tensor) -> Tensor:
        """(N, ..., 3) cached voxel coordinates of the cases ``case_index`` (N,) -> reference coordinates."""
        return self.per_case(self._provider.to_reference, case_index, cached).float()

    # ----------------------------------------------------------------------------------------- views
    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        sp = self.config.spade
        crop = tuple(self.config.data.crop_size)
        boxes = raw["boxes"].to(device, non_blocking=True)
        m = boxes.shape[0]
        s1, s2 = pair_shifts(m, crop, sp.min_overlap, gen)
        out = augment(torch.cat([boxes, boxes]), crop, self.config.augment, gen,
                      keep_clean=sp.restore_weight > 0, shift=torch.cat([s1, s2]))
        case_index = torch.cat([raw["case_index"], raw["case_index"]])
        box_lower = torch.cat([raw["box_lower"], raw["box_lower"]])
        geometry = view_geometry(case_index, box_lower, out.voxel_to_box, crop, self.table, out.params)
        batch: dict[str, Any] = {
            "views": out.views, "clean": out.clean, "n_samples": 2 * m,
            "item_ids": view_item_ids(m, 2, offset=dist.rank() * m, device=device),
            "ref_centres": self.to_reference(case_index, geometry.cached_centre).to(device),
        }
        if sp.local_weight > 0:
            per_pair = max(1, sp.local_points // m)
            p1, p2, valid = overlap_points(out.voxel_to_box[:m], out.voxel_to_box[m:], crop, per_pair, gen)
            cached = apply_maps(geometry.voxel_to_cached[:m], p1)
            batch.update(p1=p1.to(device), p2=p2.to(device), valid=valid.to(device),
                         ref_points=self.to_reference(case_index[:m], cached).to(device))
        return batch

    # ---------------------------------------------------------------------------------------- losses
    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        sp = self.config.spade
        views = batch["views"]
        skips = self.backbone.encode(views)
        decoded = self.backbone.decode(skips) if self.uses_decoder else None
        mom = self.momentum
        with torch.no_grad():
            k_skips = mom["backbone"].encode(views)
            k_decoded = mom["backbone"].decode(k_skips) if sp.local_weight > 0 else None
        total = views.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor] = {}
        if sp.global_weight > 0:
            loss, g_logs = self.global_loss(skips[-1], k_skips[-1], batch)
            total = total + sp.global_weight * loss
            logs.update(g_logs)
        if sp.local_weight > 0:
            assert decoded is not None and k_decoded is not None
            loss, l_logs = self.local_loss(decoded[sp.local_stage], k_decoded[sp.local_stage], batch)
            total = total + sp.local_weight * loss
            logs.update(l_logs)
        if sp.restore_weight > 0:
            assert decoded is not None
            pred = self.restore_head(decoded[-1])
            loss = F.mse_loss(pred.float(), batch["clean"].float())
            total = total + sp.restore_weight * loss
            logs["loss_restore"] = loss.detach()
        return total, logs

    def global_loss(self, deep: Tensor, k_deep: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        sp = self.config.spade
        z = self.global_head(deep)
        with torch.no_grad():
            k = self.momentum["global_head"](k_deep).float()
        ids = dist.gather_no_grad(batch["item_ids"])
        ref = dist.gather_no_grad(batch["ref_centres"])
        q_keys, q_meta = self.global_queue.get()
        has_queue = len(self.global_queue) > 0
        pos, ex, qw, qex = spade_global_masks(ids, ref, q_meta["ref"] if has_queue else None,
                                              self.r_friend, self.r_enemy, sp.friend_sigma)
        out = info_nce(z, pos, sp.global_temperature, exclude_mask=ex, keys=k,
                       queue=q_keys if has_queue else None, queue_positive_mask=qw, queue_exclude_mask=qex,
                       gather=True)
        self._pending["global"] = (F.normalize(k, dim=1), batch["ref_centres"])
        d = out.diagnostics
        n_excluded = ex.sum(1).float().mean() + (qex.sum(1).float().mean() if qex is not None else 0.0)
        return out.loss, {"loss_global": out.loss.detach(), "mean_positives": d["mean_positives"],
                          "pos_cosine": d["pos_cosine"], "neg_cosine": d["neg_cosine"],
                          "collapse_value": d["collapse_value"], "embedding_spread": d["embedding_spread"],
                          "global_excluded": n_excluded}

    def local_loss(self, feat: Tensor, k_feat: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        sp = self.config.spade
        crop = tuple(self.config.data.crop_size)
        m = feat.shape[0] // 2
        p1, p2, valid = batch["p1"], batch["p2"], batch["valid"]
        ref = batch["ref_points"][valid].float()  # (V, 3)
        v = ref.shape[0]
        a = torch.cat([sample_at(feat[:m], p1, crop)[valid], sample_at(feat[m:], p2, crop)[valid]])  # (2V, C)
        z = self.local_head(a)
        with torch.no_grad():
            b = torch.cat([sample_at(k_feat[:m], p1, crop)[valid], sample_at(k_feat[m:], p2, crop)[valid]])
            k = self.momentum["local_head"](b).float()
        rows = torch.arange(2 * v, device=z.device)
        partner = (rows + v) % (2 * v)
        pos = torch.zeros((2 * v, 2 * v), dtype=torch.bool, device=z.device)
        pos[rows, partner] = True
        refs = torch.cat([ref, ref])
        ex = (torch.cdist(refs, refs) < self.r_local) & ~pos
        q_keys, q_meta = self.local_queue.get()
        has_queue = len(self.local_queue) > 0
        qex = torch.cdist(refs, q_meta["ref"].float()) < self.r_local if has_queue else None
        out = info_nce(z, pos, sp.local_temperature, exclude_mask=ex, keys=k,
                       queue=q_keys if has_queue else None, queue_exclude_mask=qex)
        n_push = min(sp.local_enqueue, v)
        self._pending["local"] = (F.normalize(k[v : v + n_push], dim=1), ref[:n_push])
        return out.loss, {"loss_local": out.loss.detach(), "local_pos_cosine": out.diagnostics["pos_cosine"],
                          "local_neg_cosine": out.diagnostics["neg_cosine"],
                          "local_voxels": torch.tensor(float(v), device=z.device)}

    # ------------------------------------------------------------------------------ after the step
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        sp = self.config.spade
        mu = cosine_schedule(sp.momentum, sp.momentum_end, step, self.config.steps)
        for name, target in self.momentum.items():
            ema_update(target, getattr(self, name), mu)
        if "global" in self._pending:
            keys, ref = self._pending.pop("global")
            self.global_queue.enqueue(keys, ref=ref)
        if "local" in self._pending:
            keys, ref = self._pending.pop("local")
            self.local_queue.enqueue(keys, ref=ref)

    def log_columns(self) -> list[str]:
        sp = self.config.spade
        cols: list[str] = []
        if sp.global_weight > 0:
            cols += ["loss_global", "mean_positives", "pos_cosine", "neg_cosine", "global_excluded",
                     "collapse_value", "embedding_spread", "collapse_warning"]
        if sp.local_weight > 0:
            cols += ["loss_local", "local_pos_cosine", "local_neg_cosine", "local_voxels"]
        if sp.restore_weight > 0:
            cols.append("loss_restore")
        return cols


class SpadeNoDebias(Spade):
    """Spade without spatial debiasing (every radius 0): MoCo-style global + dense local contrast."""

    name = "spade-nodebias"

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        config.spade.debias = False
        super().__init__(backbone, config, table)


SMALL = {"spade": {"global_queue": 16, "local_queue": 256, "local_points": 128}}
register_method("spade", Spade, section="spade", config=SpadeConfig, small=SMALL,
                summary="cross-scan correspondences choose global + local positives/negatives (our interpretation)")
register_method("spade-nodebias", SpadeNoDebias, section="spade", small=SMALL,
                summary="Spade without spatial debiasing")
