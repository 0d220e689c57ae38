"""Alice: cross-patient anatomical views, masked modelling, CASA alignment and self-distillation (METHODS.md §3).

Every choice is a field of :class:`AliceConfig` (the ``alice:`` config section); preset ``alice-paper`` holds the
released code's values (which does not run as released; its bugs are not repeated here).

**Views.** :class:`~volcontrast.views.pair_sampler.CrossScanPairSampler` mines ``P`` pairs per step: a tissue
point of scan A, its match in a *different* scan B through a correspondence provider (world-space, with a
confidence; low-confidence matches are rejected, redrawn and counted — never accepted), and a box around each.
Here each box is augmented once on the device (:func:`~volcontrast.views.augment.augment`): ``Q`` from scan A,
``K`` from scan B; the views before intensity augmentation are kept as the reconstruction targets ``Q⁰, K⁰``.
A tube mask ``M`` per view (:func:`~volcontrast.views.masking.tube_mask`: ``mask_ratio`` of the in-plane
``mask_block`` blocks, extruded through ``slice_axis``) gives the student inputs ``Q̃ = Q·(1−M_Q)``,
``K̃ = K·(1−M_K)`` (masked voxels set to 0); the teacher sees ``Q`` and ``K`` unmasked.

**Networks.** Student ``s``: the backbone, a global :class:`~volcontrast.losses.distill.DINOHead` ``g`` on the
global averages of the deepest ``global_stages`` encoder stages (0 = all; concatenated and standardised over the
batch, ``global_batch_norm``: see :class:`GlobalHead`), token projections ``φ_q`` (bottleneck tokens) and ``φ_kv``
(tokens of decoder stage ``decoder_stage``), one :class:`~volcontrast.nets.casa.CASABlock` ``A``, a patch
DINO head ``h`` on its output tokens and a 1×1×1 reconstruction head ``r`` on the full-resolution decoder.
Teacher ``t``: an EMA copy (no gradient) of the backbone, ``g``, ``φ_kv`` and ``h`` (and of ``A`` with
``teacher_casa="ema"``), ``θ_t ← μ θ_t + (1 − μ) θ_s`` after every step, ``μ`` cosine from ``momentum`` to
``momentum_end`` over the run. With ``τ_t`` warmed up linearly from ``teacher_temperature`` to
``teacher_temperature_end`` over ``teacher_warmup_steps`` and a centre ``c`` per head (EMA, ``center_momentum``,
of the teacher's batch-mean logits, all-reduced across ranks)::

    P_t(x) = softmax((t(x) − c) / τ_t)          P_s(x̃) = softmax(s(x̃) / τ_s)        H(p, q) = −Σ_k p_k log q_k

- inter-volume (global): ``L_inter = ½ [H(P_t^g(Q), P_s^g(K̃)) + H(P_t^g(K), P_s^g(Q̃))]`` — the matched crop of
  the *other* patient is the target;
- CASA: queries ``q = φ_q(bottleneck tokens of the masked crop)``;
  ``S = A(q, φ_kv(student decoder tokens of the masked crop))``,
  ``T = A(q, φ_kv^t(teacher decoder tokens of the unmasked crop))`` (no gradient, a target);
  intra-volume ``L_intra = mean over tokens of H(softmax((h^t(T) − c₂) / τ_t), softmax(h(S) / τ_s))``;
- reconstruction: ``L_rec = MSE(r(decoder(x̃)), x⁰)`` over the masked voxels (``rec_masked_only``; all voxels
  as in the code otherwise);
- KoLeo (DINOv2, :func:`~volcontrast.losses.distill.koleo_loss`): ``L_koleo = −mean_i log min_j ‖z_i − z_j‖``
  over the student's L2-normalised global embeddings ``z`` (the head's bottleneck) of the step's views;
- ``L = inter_weight·L_inter + intra_weight·L_intra + rec_weight·L_rec + koleo_weight·L_koleo`` (defaults 1, 1,
  5 = the code's 10/2, 0.1; the code has no KoLeo term).

**Defaults against collapse.** At CPU scale (16³ crops, a narrow U-Net, RESULTS.md) DINO's teacher temperatures
0.04 → 0.07 let the global branch collapse to a uniform teacher within ~100 steps: the student cannot yet
predict the other patient's crop, hedges towards a uniform output, and the EMA teacher follows. The defaults
keep it learning: a sharp teacher (0.01, close to the code's 0.008 → 0.01), KoLeo 0.1, and every encoder stage
pooled into the global token.

Every branch is always computed (a weight of 0 only zeroes its gradient), so DDP sees every parameter used.

**Logs** (per step): the four losses; ``teacher_entropy`` (mean entropy of the global teacher targets, nats:
``ln K`` = uniform, 0 = one-hot); ``prototype_usage`` (fraction of the ``K`` global prototypes that are the
argmax of at least one teacher row of the step, gathered across ranks; ``1/K`` = every row the same prototype,
the DINO collapse) and ``prototype_perplexity`` (``exp H(mean target) / K``); ``token_usage`` (the same for
the CASA tokens); ``teacher_temperature``; ``momentum``; ``rejected_matches`` and ``match_confidence`` from
the view miner. The collapse monitor (:meth:`Alice.monitors`) warns when ``prototype_usage`` stays below
:meth:`AliceConfig.collapse_floor` (default ``2/K``: one prototype for every crop) or
``teacher_entropy`` above :meth:`AliceConfig.collapse_ceiling` (default
``0.99 ln K``: a uniform teacher).

**Optimiser** (:meth:`Alice.optimizer_groups`): the DINO heads train at ``head_lr_scale`` x the learning rate
and their prototype layers are frozen for ``freeze_last_layer_steps`` steps (DINO; 1 epoch in the Alice code).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from volcontrast import dist
from volcontrast.errors import InputError
from volcontrast.losses.distill import (
    Centering,
    DINOHead,
    cosine_schedule,
    distill_loss,
    koleo_loss,
    prototype_usage,
    teacher_entropy,
    warmup_then_constant,
)
from volcontrast.methods.base import PretrainMethod, ema_update
from volcontrast.methods.monitors import Monitor, SelfDistillationCollapse
from volcontrast.methods.registry import register_method, register_preset
from volcontrast.nets.base import Backbone
from volcontrast.nets.casa import CASABlock, TokenProjection, to_tokens
from volcontrast.nets.heads import ReconstructionHead
from volcontrast.views.augment import augment
from volcontrast.views.geometry import CaseTable
from volcontrast.views.masking import apply_mask, masked_mse, tube_mask
from volcontrast.views.pair_sampler import CrossScanPairSampler, PairSamplerConfig
from volcontrast.views.sampler import StepSampler, box_size_for

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig

@dataclass
class AliceConfig:
    """Alice (METHODS.md section 3): cross-scan views, tube-masked student, EMA teacher, self-distillation, CASA.

    Defaults are the values that keep the global branch learning at small scale (sharp teacher 0.01, KoLeo 0.1,
    every encoder stage pooled: measured in benchmarks/RESULTS.md); preset ``alice-paper`` holds the released
    code's values.
    """

    # cross-scan view mining (views/pair_sampler.py)
    provider: str = "body"  # correspondence provider: body | affine | index (or a registered one)
    min_confidence: float = 0.5  # matches below this are rejected and redrawn (counted, never accepted)
    max_tries: int = 50  # candidates per pair before an InputError
    pairs_per_batch: int = 4  # (Q, K) pairs per step and rank: 2 x pairs views
    # tube masks (views/masking.py): in-plane blocks extruded through slice_axis, voxels set to 0
    mask_ratio: float = 0.75  # fraction of in-plane blocks masked, in [0, 1)
    mask_block: tuple[int, int] = (16, 16)  # in-plane block size (axes other than slice_axis, in axis order)
    slice_axis: int = 2  # spatial axis the blocks are extruded through (2 = z after canonical RAS+)
    # DINO heads (losses/distill.py): global head on the pooled bottleneck, patch head on the CASA tokens
    num_prototypes: int = 512  # K, for both heads
    # standardise the pooled bottleneck over the batch before the global head (BatchNorm without affine or running
    # statistics): the global average of an instance-normed stage hardly differs between crops, so without it
    # every crop starts on the same prototype and centering turns the teacher uniform (collapse)
    global_batch_norm: bool = True
    # the global token pools the deepest global_stages encoder stages (concatenated; 0 = every stage): the pooled
    # instance-normed bottleneck alone carries no crop identity at initialisation (see methods/alice.GlobalHead)
    global_stages: int = 0
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_lr_scale: float = 1.0  # learning rate of both DINO heads = this x optim.lr (schedule included)
    freeze_last_layer_steps: int = 0  # the heads' prototype layers stay fixed (lr 0) for this many steps
    student_temperature: float = 0.1
    # the teacher is sharp (the code: 0.008 -> 0.01): with DINO's 0.04 -> 0.07 a student that cannot yet predict
    # the other patient's crop hedges towards uniform and the teacher follows it (uniform collapse, RESULTS.md)
    teacher_temperature: float = 0.01  # linear warm-up from this ...
    teacher_temperature_end: float = 0.01  # ... to this, then constant
    teacher_warmup_steps: float = 0.3  # < 1: fraction of the run's steps; >= 1: a step count
    center_momentum: float = 0.9  # EMA of the teacher's batch-mean logits (one centre per head)
    momentum: float = 0.996  # teacher EMA momentum, cosine schedule to momentum_end over the run
    momentum_end: float = 1.0
    # CASA (nets/casa.py): queries = student bottleneck tokens of the masked crop
    casa_dim: int = 256  # common token size (TokenProjection of each source)
    casa_heads: int = 8
    casa_ffn_ratio: float = 4.0
    casa_dropout: float = 0.0
    teacher_casa: str = "shared"  # T through the student's CASA block (code) | "ema": the teacher's EMA copy
    # keys/values: decoder stage (index into the backbone's decoder stages, deep -> shallow): 0 = the first
    # decoder stage, one up-sampling above the bottleneck (nnFormer in the code: 8³ = 512 tokens at 64³);
    # -1 = full resolution (far too many tokens)
    decoder_stage: int = 0
    # loss = inter_weight * L_inter + intra_weight * L_intra + rec_weight * L_rec
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    rec_weight: float = 5.0  # the code's 10 x MSE / 2
    rec_masked_only: bool = True  # MSE on masked voxels (paper, MAE-style); False: all voxels (code)
    # KoLeo spread of the student's global embeddings (DINOv2), added to the loss: keeps the student's crops apart
    # while it cannot predict the teacher yet (0 = off, as in the code)
    koleo_weight: float = 0.1
    # collapse monitor (engine): warn when the global teacher sends every crop to one prototype (prototype usage
    # below usage_floor; 0 = 2 / num_prototypes) or turns uniform (entropy above entropy_ceiling x ln K; 0 = off)
    usage_floor: float = 0.0
    entropy_ceiling: float = 0.99

    def warmup_steps(self, total_steps: int) -> int:
        """The teacher-temperature warm-up in steps (a fraction < 1 of ``total_steps``, else a count)."""
        w = float(self.teacher_warmup_steps)
        return round(w * total_steps) if w < 1 else round(w)

    def collapse_floor(self) -> float:
        """Prototype-usage floor of the collapse monitor."""
        return float(self.usage_floor) if self.usage_floor > 0 else 2.0 / self.num_prototypes

    def collapse_ceiling(self) -> float:
        """Teacher-entropy ceiling of the collapse monitor, in nats (0 = off)."""
        return float(self.entropy_ceiling) * math.log(self.num_prototypes)


__all__ = ["Alice", "AliceConfig", "GlobalHead"]


class GlobalHead(nn.Module):
    """The global token: global averages of the deepest ``stages`` encoder stages, concatenated, (batch
    standardisation) -> :class:`DINOHead`.

    The global average of an instance-normed stage keeps only the shape of each channel's distribution (the norm
    removes its mean and scale), and over the few voxels of a CNN bottleneck (2³-4³) that shape is noise: at
    initialisation the pooled bottlenecks of two views of the *same* box are no more alike than those of any two
    crops (measured in benchmarks/RESULTS.md), so the teacher's global targets carry nothing a student could
    predict and self-distillation collapses to a uniform teacher. Shallower stages pool over many voxels and do
    carry the crop's identity from the start; ``stages`` > 1 adds them (``stages = 1``: the bottleneck alone, as
    the released code pools nnFormer's bottleneck, whose LayerNorm keeps each channel's spatial mean).

    With ``batch_norm`` the pooled ``(B, C)`` features are standardised per channel over the batch
    (``BatchNorm1d`` without affine parameters or running statistics: the same in train and eval mode, for student
    and teacher), so no stage dominates by its scale and the rows start apart.

    Shapes:
        the encoder's skips (``(B, C_i, *spatial_i)`` per stage) -> ``(B, K)``.
    """

    def __init__(self, in_dims: Sequence[int], head: DINOHead, batch_norm: bool = True, stages: int = 1) -> None:
        super().__init__()
        if not 1 <= stages <= len(in_dims):
            raise ValueError(f"stages must be in 1..{len(in_dims)}, got {stages}")
        self.stages = int(stages)
        width = sum(in_dims[-self.stages:])
        if head.in_dim != width:
            raise ValueError(f"the head takes {head.in_dim} features, the last {stages} stages give {width}")
        self.norm: nn.Module = (nn.BatchNorm1d(width, affine=False, track_running_stats=False) if batch_norm
                                else nn.Identity())
        self.head = head

    def pooled(self, skips: Sequence[Tensor]) -> Tensor:
        """``(B, Σ C_i)``: the global averages of the deepest ``stages`` stages, concatenated."""
        return torch.cat([s.flatten(2).mean(-1) for s in skips[-self.stages:]], dim=1)

    def embed(self, skips: Sequence[Tensor]) -> Tensor:
        """The head's L2-normalised bottleneck ``(B, bottleneck_dim)`` (what KoLeo spreads)."""
        return self.head.embed(self.norm(self.pooled(skips)))

    def logits(self, embedding: Tensor) -> Tensor:
        """``(B, K)`` prototype scores of an :meth:`embed` output."""
        return self.head.last_layer(embedding)

    def forward(self, skips: Sequence[Tensor]) -> Tensor:
        return self.logits(self.embed(skips))


class Alice(PretrainMethod):
    """Alice on any :class:`~volcontrast.nets.base.Backbone` (3D U-Nets: tokens = bottleneck vectors; SwinUNETR).

    Teacher parts live in ``self.teacher`` (a ``ModuleDict`` of EMA copies, ``requires_grad=False``, always in
    eval mode); the two :class:`~volcontrast.losses.distill.Centering` buffers are in the state dict, so
    ``--resume`` continues exactly.
    """

    name = "alice"
    uses_decoder = True

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        a = config.alice
        if config.dim != 3:
            raise InputError("--dim", f"alice works on 3D crops only, got dim {config.dim}")
        if not 0.0 <= a.mask_ratio < 1.0:
            raise InputError("alice.mask_ratio", f"must be in [0, 1), got {a.mask_ratio}")
        if a.slice_axis not in (-3, -2, -1, 0, 1, 2):
            raise InputError("alice.slice_axis", f"must be 0, 1 or 2, got {a.slice_axis}")
        axis = a.slice_axis % 3
        plane = [int(s) for i, s in enumerate(config.data.crop_size) if i != axis]
        block = [int(b) for b in a.mask_block]
        if len(block) != 2 or min(block) < 1:
            raise InputError("alice.mask_block", f"needs two in-plane sizes >= 1, got {list(a.mask_block)}")
        if any(b >= p for b, p in zip(block, plane)):
            raise InputError("alice.mask_block", f"in-plane block {block} must be smaller than the crop's in-plane "
                                                 f"size {plane} (crop {list(config.data.crop_size)}, slice axis "
                                                 f"{axis}); use smaller blocks for small crops, e.g. "
                                                 "`alice: {mask_block: [4, 4]}` in a --config YAML")
        if not 0.0 <= a.min_confidence <= 1.0:
            raise InputError("alice.min_confidence", f"must be in [0, 1], got {a.min_confidence}")
        for name in ("max_tries", "pairs_per_batch", "num_prototypes", "head_hidden", "head_bottleneck",
                     "casa_dim", "casa_heads"):
            if int(getattr(a, name)) < 1:
                raise InputError(f"alice.{name}", f"must be >= 1, got {getattr(a, name)}")
        if int(a.global_stages) < 0:
            raise InputError("alice.global_stages", f"must be >= 0 (0 = every encoder stage), got {a.global_stages}")
        if a.casa_dim % a.casa_heads:
            raise InputError("alice.casa_dim", f"must be a multiple of casa_heads ({a.casa_heads}), got {a.casa_dim}")
        for name in ("student_temperature", "teacher_temperature", "teacher_temperature_end", "casa_ffn_ratio"):
            if not float(getattr(a, name)) > 0:
                raise InputError(f"alice.{name}", f"must be > 0, got {getattr(a, name)}")
        if not 0.0 <= a.casa_dropout < 1.0:
            raise InputError("alice.casa_dropout", f"must be in [0, 1), got {a.casa_dropout}")
        if a.teacher_warmup_steps < 0:
            raise InputError("alice.teacher_warmup_steps", f"must be >= 0, got {a.teacher_warmup_steps}")
        if not 0.0 <= a.center_momentum <= 1.0:
            raise InputError("alice.center_momentum", f"must be in [0, 1], got {a.center_momentum}")
        if not 0.0 <= a.momentum <= a.momentum_end <= 1.0:
            raise InputError("alice.momentum", f"need 0 <= momentum <= momentum_end <= 1, got {a.momentum}, "
                                               f"{a.momentum_end}")
        if a.teacher_casa not in ("shared", "ema"):
            raise InputError("alice.teacher_casa", f"must be shared or ema, got {a.teacher_casa!r}")
        weights = (a.inter_weight, a.intra_weight, a.rec_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise InputError("alice", f"loss weights must be >= 0 and not all 0, got inter/intra/rec {weights}")
        if a.koleo_weight < 0:
            raise InputError("alice.koleo_weight", f"must be >= 0, got {a.koleo_weight}")
        if not 0.0 <= a.usage_floor < 1.0:
            raise InputError("alice.usage_floor", f"must be in [0, 1), got {a.usage_floor}")
        if not 0.0 <= a.entropy_ceiling <= 1.0:
            raise InputError("alice.entropy_ceiling", f"must be in [0, 1], got {a.entropy_ceiling}")
        if a.head_lr_scale < 0 or a.freeze_last_layer_steps < 0:
            raise InputError("alice", f"head_lr_scale and freeze_last_layer_steps must be >= 0, got "
                                      f"{a.head_lr_scale}, {a.freeze_last_layer_steps}")

    def build_sampler(self, cache_root: Any, pool: list[str], rank: int) -> StepSampler:
        """Pairs of boxes at matched anatomy of two different scans (``alice.pairs_per_batch`` pairs per step
        and rank)."""
        c, a = self.config, self.config.alice
        crop = tuple(c.data.crop_size)
        pair_cfg = PairSamplerConfig(crop_size=crop, box_size=box_size_for(crop, c.augment.context),
                                     pairs_per_batch=a.pairs_per_batch, provider=a.provider,
                                     min_confidence=a.min_confidence, max_tries=a.max_tries)
        return CrossScanPairSampler(cache_root, pool, pair_cfg, seed=c.seed, rank=rank, steps=c.steps)

    def monitors(self) -> list[Monitor]:
        a = self.config.alice
        return [SelfDistillationCollapse(usage_floor=a.collapse_floor(), entropy_ceiling=a.collapse_ceiling())]

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__(backbone, config, table)
        a = config.alice
        if backbone.dim != 3:
            raise InputError("--dim", "alice works on 3D crops only")
        n_stages = len(backbone.decoder_channels)
        if not -n_stages <= a.decoder_stage < n_stages:
            raise InputError("alice.decoder_stage", f"the backbone has {n_stages} decoder stages "
                                                    f"(0..{n_stages - 1}, or negative from the end)")
        backbone.seg_head.requires_grad_(False)  # never used in pretraining
        deep = backbone.encoder_channels[-1]
        k = a.num_prototypes
        n_enc = len(backbone.encoder_channels)
        stages = n_enc if a.global_stages == 0 else a.global_stages
        if not 1 <= stages <= n_enc:
            raise InputError("alice.global_stages", f"the backbone has {n_enc} encoder stages (1..{n_enc}, or 0 = all)"
                                                    f", got {a.global_stages}")
        width = sum(backbone.encoder_channels[-stages:])
        self.global_head = GlobalHead(backbone.encoder_channels, DINOHead(width, k, a.head_hidden, a.head_bottleneck),
                                      a.global_batch_norm, stages)
        self.q_proj = TokenProjection(deep, a.casa_dim)
        self.kv_proj = TokenProjection(backbone.decoder_channels[a.decoder_stage], a.casa_dim)
        self.casa = CASABlock(a.casa_dim, a.casa_heads, a.casa_ffn_ratio, a.casa_dropout)
        self.patch_head = DINOHead(a.casa_dim, k, a.head_hidden, a.head_bottleneck)
        self.rec_head = ReconstructionHead(backbone.decoder_channels[-1], backbone.in_channels, dim=3)
        parts = ["backbone", "global_head", "kv_proj", "patch_head"] + (["casa"] if a.teacher_casa == "ema" else [])
        self.teacher = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in parts})
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.global_centre = Centering(k, a.center_momentum)
        self.token_centre = Centering(k, a.center_momentum)
        self._pending: dict[str, Tensor] = {}
        self.fit_provider(a.provider)  # e.g. affine: registered once, stored in the cache

    def train(self, mode: bool = True) -> Alice:
        super().train(mode)
        self.teacher.eval()  # a target network: no dropout, whatever the student does
        return self

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters in three groups: the rest of the student; the DINO heads' MLPs (``head_lr_scale``
        x the learning rate); their prototype layers (also ``head_lr_scale``, and lr 0 for the first
        ``freeze_last_layer_steps`` steps, as DINO and the Alice code do)."""
        a = self.config.alice
        heads = [self.global_head, self.patch_head]
        last = {id(p) for h in (self.global_head.head, self.patch_head) for p in h.last_layer.parameters()}
        head = {id(p) for h in heads for p in h.parameters()} - last
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in trainable if id(p) not in last and id(p) not in head]},
            {"params": [p for p in trainable if id(p) in head], "lr_scale": a.head_lr_scale},
            {"params": [p for p in trainable if id(p) in last], "lr_scale": a.head_lr_scale,
             "frozen_steps": a.freeze_last_layer_steps},
        ]

    # ------------------------------------------------------------------------------------ schedules
    def teacher_temperature(self, step: int) -> float:
        a = self.config.alice
        return warmup_then_constant(a.teacher_temperature, a.teacher_temperature_end,
                                    a.warmup_steps(self.config.steps), step)

    def momentum_at(self, step: int) -> float:
        a = self.config.alice
        return cosine_schedule(a.momentum, a.momentum_end, step, self.config.steps)

    # ----------------------------------------------------------------------------------------- views
    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        """Q (scan A) and K (scan B) views, their tube masks and masked copies; P pairs -> 2P views [Q; K].

        Returns ``views`` (teacher inputs, unmasked), ``masked`` (student inputs), ``clean`` (reconstruction
        targets: the views before intensity augmentation), ``mask`` (bool, True = masked), ``pairs``,
        ``n_samples`` (2P), ``step`` and the miner's ``rejected``/``tries``/``confidence`` for the logs.
        """
        a = self.config.alice
        crop = tuple(int(c) for c in self.config.data.crop_size)
        boxes_a = torch.as_tensor(raw["boxes_a"])
        boxes = torch.cat([boxes_a, torch.as_tensor(raw["boxes_b"])]).to(device, non_blocking=True)
        p = boxes_a.shape[0]
        out = augment(boxes, crop, self.config.augment, gen, keep_clean=True)
        assert out.clean is not None
        mask = tube_mask(2 * p, crop, a.mask_ratio, tuple(a.mask_block), a.slice_axis, generator=gen, device=device)
        return {
            "views": out.views, "masked": apply_mask(out.views, mask), "clean": out.clean, "mask": mask,
            "pairs": p, "n_samples": 2 * p, "step": int(step),
            "rejected": float(torch.as_tensor(raw["rejected"]).sum()),
            "tries": float(torch.as_tensor(raw["tries"]).sum()),
            "confidence": float(torch.as_tensor(raw["confidence"]).double().mean()),
        }

    # ---------------------------------------------------------------------------------------- losses
    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        a = self.config.alice
        p, step, stage = int(batch["pairs"]), int(batch["step"]), a.decoder_stage
        tau_t = self.teacher_temperature(step)
        t = self.teacher
        # ---- teacher on the unmasked views (a target: no graph)
        with torch.no_grad():
            t_skips = t["backbone"].encode(batch["views"])
            t_dec = t["backbone"].decode(t_skips)
            t_global = t["global_head"](t_skips)  # (2P, K)
            t_kv = to_tokens(t_dec[stage], t["kv_proj"])  # (2P, Nk, d)
        # ---- student on the masked views
        skips = self.backbone.encode(batch["masked"])
        dec = self.backbone.decode(skips)
        # inter-volume: teacher(Q) -> student(K~) and teacher(K) -> student(Q~)
        s_embed = self.global_head.embed(skips)
        s_global = self.global_head.logits(s_embed)
        loss_koleo = koleo_loss(s_embed)  # 2P >= 2 rows (pairs_per_batch >= 1)
        p_global = self.global_centre.targets(t_global, tau_t)
        swapped = torch.cat([s_global[p:], s_global[:p]])
        loss_inter = distill_loss(swapped, p_global, a.student_temperature)
        # CASA: student queries over student decoder tokens -> S, over teacher decoder tokens -> T
        queries = to_tokens(skips[-1], self.q_proj)  # (2P, Nq, d)
        s_tokens = self.casa(queries, to_tokens(dec[stage], self.kv_proj))
        with torch.no_grad():
            casa_t = t["casa"] if a.teacher_casa == "ema" else self.casa
            t_patch = t["patch_head"](casa_t(queries.detach(), t_kv))  # (2P, Nq, K)
        p_tokens = self.token_centre.targets(t_patch, tau_t)
        loss_intra = distill_loss(self.patch_head(s_tokens), p_tokens, a.student_temperature)
        # reconstruction of the clean views from the masked ones
        recon = self.rec_head(dec[-1])
        loss_rec = masked_mse(recon, batch["clean"], batch["mask"], a.rec_masked_only)
        total = (a.inter_weight * loss_inter + a.intra_weight * loss_intra + a.rec_weight * loss_rec
                 + a.koleo_weight * loss_koleo)
        self._pending = {"global": t_global.detach(), "tokens": t_patch.detach()}  # centres: after the step
        usage = prototype_usage(dist.gather_no_grad(p_global))
        logs: dict[str, Tensor | float] = {
            "loss_inter": loss_inter.detach(), "loss_intra": loss_intra.detach(), "loss_rec": loss_rec.detach(),
            "loss_koleo": loss_koleo.detach(),
            "teacher_entropy": teacher_entropy(p_global),
            "prototype_usage": usage["argmax_fraction"], "prototype_perplexity": usage["perplexity_fraction"],
            "token_usage": prototype_usage(p_tokens)["argmax_fraction"],
            "teacher_temperature": tau_t, "momentum": self.momentum_at(step),
            "rejected_matches": float(batch["rejected"]), "match_confidence": float(batch["confidence"]),
        }
        return total, logs

    # ------------------------------------------------------------------------------ after the step
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA of the teacher parts (cosine momentum) and the centre updates with this step's teacher logits."""
        mu = self.momentum_at(step)
        for name, target in self.teacher.items():
            ema_update(target, getattr(self, name), mu)
        if self._pending:
            self.global_centre.update(self._pending["global"])
            self.token_centre.update(self._pending["tokens"])
            self._pending = {}

    def log_columns(self) -> list[str]:
        return ["loss_inter", "loss_intra", "loss_rec", "loss_koleo", "teacher_entropy", "prototype_usage",
                "prototype_perplexity", "token_usage", "teacher_temperature", "momentum", "rejected_matches",
                "match_confidence", "collapse_warning"]


register_method("alice", Alice, section="alice", config=AliceConfig,
                summary="cross-patient views, masked modelling, CASA, self-distillation",
                small={"alice": {"mask_block": [4, 4], "num_prototypes": 64, "head_hidden": 64, "head_bottleneck": 32,
                                 "casa_dim": 32, "casa_heads": 4, "pairs_per_batch": 2}})
register_preset("alice-paper", {  # METHODS.md section 3 with the released code's values (research/alice.md section 0)
    "method": "alice",
    "steps": 10000,
    # 64³ crops; the code pairs one scan with the previous batch's (batch 1 per GPU): we mine 8 pairs/step
    "data": {"crop_size": [64, 64, 64], "workers": 8},
    # nnU-Net widths with 5 stages: bottleneck 4³ = 64 query tokens and first decoder stage 8³ = 512
    # key/value tokens at 64³, the token counts of nnFormer in the code
    "model": {"preset": "nnunet-3d", "overrides": {"features_per_stage": [32, 64, 128, 256, 320],
                                                   "strides": [1, 2, 2, 2, 2], "n_conv_per_stage": [2] * 5,
                                                   "n_conv_per_stage_decoder": [2] * 4}},
    # AdamW, weight decay 0.04 (the code's start value; it ramps to 0.4), clipping 3 (the code's is per
    # parameter), warm-up then cosine
    "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04, "warmup_steps": 500, "min_lr": 1e-5,
              "grad_clip": 3.0},
    # the code's augmentations are computed and discarded: views are the plain crops
    "augment": {"flip_prob": 0.0, "spatial_prob": 0.0, "brightness_prob": 0.0, "contrast_prob": 0.0,
                "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0, "context": 1.0},
    "alice": {"pairs_per_batch": 8, "mask_ratio": 0.75, "mask_block": [16, 16], "slice_axis": 2,
              "num_prototypes": 512, "head_hidden": 2048, "head_bottleneck": 256, "student_temperature": 0.1,
              "teacher_temperature": 0.008, "teacher_temperature_end": 0.01,
              "teacher_warmup_steps": 0.03,  # 30 of 1000 epochs
              "freeze_last_layer_steps": 100,  # the code: 1 epoch (of 1000)
              "center_momentum": 0.9, "momentum": 0.996, "momentum_end": 1.0, "casa_dim": 512,
              "casa_heads": 8, "casa_dropout": 0.1, "teacher_casa": "shared", "decoder_stage": 0,
              "inter_weight": 1.0, "intra_weight": 1.0, "rec_weight": 5.0, "rec_masked_only": False,
              # the code pools the bottleneck alone and has no KoLeo term
              "global_stages": 1, "koleo_weight": 0.0},
    "log_every": 50, "checkpoint_every": 1000, "keep_every": 5000, "probe_every": 1000,
})
