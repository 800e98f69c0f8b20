"""
Denoising query groups (DN-DETR, Li et al. CVPR 2022; contrastive denoising of DINO, Zhang et al.
ICLR 2023), plugged into the decoder through ``query_groups.py``; training only.

Each group holds one noised copy of every ground-truth object of the image (padded to the most
objects of an image in the batch): content = ``label_embed(noised label)``, reference box = the
noised box, position = the two-stage box embedding of that box (``transformer.embed_reference_boxes``).
With ``contrastive`` a group also holds a negative copy of every object (box noise between 1 and 2 x
the scale), to be classified as background. The matching queries cannot see any denoising group and
the groups cannot see each other; denoising queries see the matching ones. Each positive query is
trained to reconstruct its object (focal + L1 + GIoU, every decoder layer), without matching.

Stored as ``training_groups.denoising.label_embed.weight`` (num_classes, hidden_dim): the only
parameter, unused at inference; a plain model ignores it (see docs/model.md).
"""

import torch
from torch import nn
from torchvision.ops import box_convert

from ..errors import ConfigError
from .box_ops import inverse_sigmoid
from .query_groups import TRAINING_QUERY_GROUPS_REGISTRY, QueryGroup

__all__ = ["DenoisingGroups", "noise_labels", "noise_boxes", "denoising"]

MIN_BOX_SIZE = 1e-4


def noise_labels(labels, ratio, num_classes, generator=None):
    """Replace each label by a uniformly drawn class in [0, num_classes) with probability ``ratio``."""
    if ratio <= 0 or labels.numel() == 0:
        return labels.clone()
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio
    random = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, random, labels)


def noise_boxes(boxes, scale, negative=False, generator=None):
    """
    DINO's corner noise: each corner of a cxcywh box moves by ``u * scale * (w/2, h/2)`` with a random
    sign, ``u`` in [0, 1) (positive) or [1, 2) (negative); corners are clamped to [0, 1] and
    re-ordered, sizes kept >= ``MIN_BOX_SIZE``.
    Args:
        boxes: (..., 4) cxcywh in [0, 1].
    Returns:
        (..., 4) cxcywh, every coordinate in [0, 1], w and h > 0.
    """
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2
    u = torch.rand(boxes.shape, generator=generator, device=boxes.device) + (1.0 if negative else 0.0)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device) * 2.0 - 1.0
    xyxy = (xyxy + sign * u * half * scale).clamp(0.0, 1.0)
    lo = torch.minimum(xyxy[..., :2], xyxy[..., 2:])
    hi = torch.maximum(xyxy[..., :2], xyxy[..., 2:])
    size = (hi - lo).clamp(min=MIN_BOX_SIZE)
    centre = ((lo + hi) / 2).clamp(size / 2, 1 - size / 2)
    return torch.cat([centre, size], -1)


class DenoisingGroups(nn.Module):
    """
    Training-only denoising groups (see the module docstring).

    Args:
        num_classes, hidden_dim: of the detector.
        num_groups: fixed number of groups; or, with ``dynamic_num_queries`` > 0,
            ``max(1, dynamic_num_queries // (queries per group))`` groups, a group holding
            ``max objects per image`` queries (twice that with ``contrastive``), as DINO's ``dn_number``.
        box_noise_scale, label_noise_ratio: noise of :func:`noise_boxes` / :func:`noise_labels`.
        contrastive: add DINO's negative queries.
    """

    def __init__(
        self,
        num_classes,
        hidden_dim,
        num_groups=5,
        dynamic_num_queries=0,
        box_noise_scale=0.4,
        label_noise_ratio=0.2,
        contrastive=False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_groups = num_groups
        self.dynamic_num_queries = dynamic_num_queries
        self.box_noise_scale = box_noise_scale
        self.label_noise_ratio = label_noise_ratio
        self.contrastive = contrastive
        # drawn from a forked RNG: the rest of the model initialises as it does without denoising
        with torch.random.fork_rng(devices=[]):
            self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def groups_for(self, max_objects):
        """Number of groups for a batch whose largest image has ``max_objects`` objects (>= 1)."""
        if self.dynamic_num_queries > 0:
            per_group = max_objects * (2 if self.contrastive else 1)
            return max(1, self.dynamic_num_queries // per_group)
        return self.num_groups

    def make_queries(self, targets, generator=None):
        """
        Noised labels and boxes of every group.
        Args:
            targets: list of N dicts with ``labels`` (T_i,) and ``boxes`` (T_i, 4) cxcywh in [0, 1].
        Returns:
            None when the batch has no object, else a dict: ``labels`` (N, G, P) int64, ``boxes``
            (N, G, P, 4) cxcywh, ``valid`` (N, P) bool (real object, positive or negative copy),
            ``positive`` (P,) bool, ``num_groups`` G, ``max_objects`` M; P = M (2M with contrastive,
            positives first).
        """
        counts = [len(t["labels"]) for t in targets]
        m = max(counts) if counts else 0
        if m == 0:
            return None
        n, g = len(targets), self.groups_for(m)
        device = targets[0]["boxes"].device
        labels = torch.zeros((n, m), dtype=torch.long, device=device)
        boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(n, m, 1)
        valid = torch.zeros((n, m), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            labels[i, : counts[i]] = t["labels"]
            boxes[i, : counts[i]] = t["boxes"].to(boxes)
            valid[i, : counts[i]] = True
        labels = labels[:, None].expand(n, g, m)
        boxes = boxes[:, None].expand(n, g, m, 4)
        noised_labels = [noise_labels(labels, self.label_noise_ratio, self.num_classes, generator)]
        noised_boxes = [noise_boxes(boxes, self.box_noise_scale, False, generator)]
        positive = [torch.ones(m, dtype=torch.bool, device=device)]
        if self.contrastive:
            noised_labels.append(noise_labels(labels, self.label_noise_ratio, self.num_classes, generator))
            noised_boxes.append(noise_boxes(boxes, self.box_noise_scale, True, generator))
            positive.append(torch.zeros(m, dtype=torch.bool, device=device))
            valid = torch.cat([valid, valid], 1)
        pad = ~valid[:, None, :, None]
        full_image = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device)
        return {
            "labels": torch.cat(noised_labels, 2),
            "boxes": torch.where(pad, full_image, torch.cat(noised_boxes, 2)),
            "valid": valid,
            "positive": torch.cat(positive),
            "num_groups": g,
            "max_objects": m,
        }

    def make_groups(self, targets, groups, transformer, context=None):
        """Denoising ``QueryGroup`` s ``dn0``.. and the blocked pairs (see ``query_groups.py``; ``context``
        is not used)."""
        if groups[0].reference_points.shape[-1] != 4:
            raise ValueError("denoising groups need 4-d reference boxes (two-stage)")
        q = self.make_queries(targets)
        if q is None:
            return [], [], None
        n, g, p = q["labels"].shape
        content = self.label_embed(q["labels"]) * q["valid"][:, None, :, None]
        position, _ = transformer.embed_reference_boxes(inverse_sigmoid(q["boxes"]).flatten(1, 2))
        position = position.view(n, g, p, -1)
        names = [f"dn{k}" for k in range(g)]
        dn = [QueryGroup(names[k], content[:, k], position[:, k], q["boxes"][:, k]) for k in range(g)]
        blocked = [(other.name, name) for other in groups for name in names]
        blocked += [(a, b) for a in names for b in names if a != b]
        q["names"] = names
        q["num_objects"] = [len(t["labels"]) for t in targets]
        return dn, blocked, q

    def indices(self, meta):
        """Per image (query index in the concatenated groups, target index) of the positive queries."""
        g, p = meta["num_groups"], meta["labels"].shape[2]
        out = []
        for t in meta["num_objects"]:
            tgt = torch.arange(t).repeat(g)
            src = (torch.arange(g) * p).repeat_interleave(t) + tgt
            out.append((src, tgt))
        return out

    def losses(self, group_outputs, targets, meta, criterion):
        """
        Weighted reconstruction losses ``loss_{ce,bbox,giou}_dn`` (+ ``_dn_{i}`` for the auxiliary
        layers), with DN-DETR's normalisation: ``num_boxes x num_groups`` (num_boxes all-reduced as for
        the matching losses) and the focal loss x the number of denoising queries.
        """
        device = self.label_embed.weight.device
        num_boxes = criterion.get_num_boxes(targets, device)  # every worker calls it: a collective
        if meta is None:
            zero = self.label_embed.weight.sum() * 0.0  # keeps the parameter in the graph (DDP)
            return {"loss_ce_dn": zero, "loss_bbox_dn": zero, "loss_giou_dn": zero}
        outs = [group_outputs[name] for name in meta["names"]]
        indices = self.indices(meta)
        norm = num_boxes * meta["num_groups"]

        def cat(layer_outputs):
            return {k: torch.cat([o[k] for o in layer_outputs], 1) for k in ("pred_logits", "pred_boxes")}

        losses = criterion._layer_losses(cat(outs), targets, norm, "_dn", indices)
        for i in range(len(outs[0].get("aux_outputs", []))):
            aux = cat([o["aux_outputs"][i] for o in outs])
            losses.update(criterion._layer_losses(aux, targets, norm, f"_dn_{i}", indices))
        return criterion.apply_weights(losses)


@TRAINING_QUERY_GROUPS_REGISTRY.register()
def denoising(cfg, num_classes, hidden_dim):
    """
    ``DenoisingGroups`` from ``MODEL.DEFORMABLE_DETR.DN`` (None unless ``DN.ENABLED``); registered
    as "denoising", its key in the detector's ``training_groups``.
    """
    c = cfg.MODEL.DEFORMABLE_DETR
    dn = c.DN
    if not dn.ENABLED:
        return None
    if not c.TWO_STAGE:
        raise ConfigError(
            "MODEL.DEFORMABLE_DETR.DN.ENABLED needs TWO_STAGE: True (denoising queries are boxes, "
            "embedded by the two-stage pos_trans)"
        )
    if dn.NUM_GROUPS < 1 or dn.DYNAMIC_NUM_QUERIES < 0:
        raise ConfigError(
            f"MODEL.DEFORMABLE_DETR.DN: NUM_GROUPS must be >= 1 and DYNAMIC_NUM_QUERIES >= 0, got "
            f"{dn.NUM_GROUPS} / {dn.DYNAMIC_NUM_QUERIES}"
        )
    if dn.BOX_NOISE_SCALE < 0 or not 0 <= dn.LABEL_NOISE_RATIO <= 1:
        raise ConfigError(
            f"MODEL.DEFORMABLE_DETR.DN: BOX_NOISE_SCALE must be >= 0 and LABEL_NOISE_RATIO in [0, 1], got "
            f"{dn.BOX_NOISE_SCALE} / {dn.LABEL_NOISE_RATIO}"
        )
    return DenoisingGroups(
        num_classes,
        hidden_dim,
        num_groups=dn.NUM_GROUPS,
        dynamic_num_queries=dn.DYNAMIC_NUM_QUERIES,
        box_noise_scale=dn.BOX_NOISE_SCALE,
        label_noise_ratio=dn.LABEL_NOISE_RATIO,
        contrastive=dn.CONTRASTIVE,
    )
