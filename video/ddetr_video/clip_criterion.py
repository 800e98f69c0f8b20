"""Tracklet-aware label assignment and the collective-average clip loss (MOTR's ClipMatcher idea).

Per frame, the decoder queries are ``[T track queries] + [Q detect queries]``:

* track query ``i`` follows object id ``track_obj_ids[i]``: its target is that object's box in this frame,
  or *no object* when the id is absent (object left / occluded) or when the query is an injected false
  positive (id ``-2``) / an empty slot (``-1``);
* detect queries are Hungarian-matched (focal class cost + L1 + GIoU, as the detector) **only** to objects
  whose id no track query follows and whose visibility (if the target has one) is at least
  ``min_birth_visibility`` (a fully occluded object cannot be *detected*, only *kept* by its track); every
  other detect query targets no object.

Losses (sigmoid focal, L1, GIoU, and the same for each auxiliary decoder layer) are *summed* over all frames
of
the clip and divided once by the number of ground-truth objects in the whole clip.

Boxes are (cx, cy, w, h) normalised to [0, 1] by the unpadded image size, as in the detector.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["ClipCriterion", "sigmoid_focal_loss_sum"]

NO_OBJECT = -1
FALSE_POSITIVE = -2


def sigmoid_focal_loss_sum(logits, targets, alpha=0.25, gamma=2.0):
    """Sum of the sigmoid focal loss (Lin et al.) over all elements. logits/targets: same shape."""
    p = logits.sigmoid()
    ce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def _cxcywh_to_xyxy(b):
    return box_convert(b, "cxcywh", "xyxy")


class ClipCriterion(nn.Module):
    """
    Args:
        num_classes: K (sigmoid classes, no background logit).
        cost_class, cost_bbox, cost_giou: Hungarian cost weights for detect queries.
        class_weight, bbox_weight, giou_weight: loss weights.
        focal_alpha, focal_gamma: focal loss parameters (also used in the class cost).
    """

    def __init__(
        self,
        num_classes,
        cost_class=2.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        class_weight=2.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        min_birth_visibility=0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.weights = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.min_birth_visibility = min_birth_visibility

    # ------------------------------------------------------------------ matching
    @torch.no_grad()
    def _hungarian(self, logits, boxes, tgt_labels, tgt_boxes):
        """logits (Q, K), boxes (Q, 4) vs M targets -> (q_idx, t_idx) int64 (on CPU)."""
        if logits.shape[0] == 0 or tgt_labels.numel() == 0:
            e = torch.zeros(0, dtype=torch.int64)
            return e, e.clone()
        p = logits.float().sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
        pos = a * (1 - p) ** g * -(p + 1e-8).log()
        c_cls = pos[:, tgt_labels] - neg[:, tgt_labels]
        c_box = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        c_giou = -generalized_box_iou(_cxcywh_to_xyxy(boxes.float()), _cxcywh_to_xyxy(tgt_boxes.float()))
        C = self.cost_bbox * c_box + self.cost_class * c_cls + self.cost_giou * c_giou
        r, c = linear_sum_assignment(C.cpu().numpy())
        return torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)

    def _match_layer(self, logits, boxes, target, track_obj_ids):
        T = track_obj_ids.numel()
        gt_ids = target["track_ids"].cpu().tolist()
        id_to_gt = {int(i): j for j, i in enumerate(gt_ids)}
        if len(id_to_gt) != len(gt_ids):
            raise ValueError(f"duplicate track_ids in one frame's targets: {gt_ids}")
        q_idx, t_idx = [], []
        tracked = set()
        for i, oid in enumerate(track_obj_ids.cpu().tolist()):
            if oid >= 0 and oid in id_to_gt:
                q_idx.append(i)
                t_idx.append(id_to_gt[oid])
                tracked.add(id_to_gt[oid])
        vis = target.get("visibility")
        visible = [True] * len(gt_ids) if vis is None else (vis >= self.min_birth_visibility).cpu().tolist()
        free = torch.as_tensor(
            [j for j in range(len(gt_ids)) if j not in tracked and visible[j]], dtype=torch.int64
        )
        dev = target["labels"].device
        r, c = self._hungarian(
            logits[T:], boxes[T:], target["labels"][free.to(dev)], target["boxes"][free.to(dev)]
        )
        q = torch.cat([torch.as_tensor(q_idx, dtype=torch.int64), r + T])
        t = torch.cat([torch.as_tensor(t_idx, dtype=torch.int64), free[c]])
        return q, t

    def match_frame(self, outputs, target, track_obj_ids):
        """
        Args:
            outputs: dict with "pred_logits" (Q_all, K), "pred_boxes" (Q_all, 4) and optional "aux_outputs"
                (list of dicts with the same keys) for one frame of one clip; the first T queries are tracks.
            target: dict "labels" (M,), "boxes" (M, 4) cxcywh in [0, 1], "track_ids" (M,) for that frame,
                optional "visibility" (M,) in [0, 1].
            track_obj_ids: (T,) int64 object id followed by each track query (-1 empty, -2 false positive).
        Returns:
            list of (query_idx, target_idx) int64 pairs, one per layer: aux layers first, final layer last.
        """
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        return [self._match_layer(o["pred_logits"], o["pred_boxes"], target, track_obj_ids) for o in layers]

    # ------------------------------------------------------------------ losses
    def _layer_losses(self, logits, boxes, target, q, t):
        onehot = torch.zeros_like(logits)
        dev = logits.device
        q, t = q.to(dev), t.to(dev)
        if q.numel():
            onehot[q, target["labels"][t]] = 1.0
        loss_ce = sigmoid_focal_loss_sum(logits, onehot, self.focal_alpha, self.focal_gamma)
        if q.numel():
            src, tgt = boxes[q], target["boxes"][t]
            loss_bbox = (src - tgt).abs().sum()
            giou = torch.diag(generalized_box_iou(_cxcywh_to_xyxy(src), _cxcywh_to_xyxy(tgt)))
            loss_giou = (1 - giou).sum()
        else:
            loss_bbox = loss_giou = boxes.sum() * 0.0
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, records):
        """
        Args:
            records: list over the frames of a clip (or of several clips) of dicts with "outputs", "target"
                and "indices" (as returned by :meth:`match_frame`).
        Returns:
            dict of weighted losses ``loss_ce, loss_bbox, loss_giou`` and ``_{i}`` suffixes for aux layers,
            each summed over frames and divided by the number of objects in all frames (at least 1).
        """
        if not records:
            raise ValueError("ClipCriterion needs at least one frame record")
        num_boxes = max(sum(int(r["target"]["labels"].numel()) for r in records), 1)
        total = {}
        for r in records:
            layers = list(r["outputs"].get("aux_outputs", [])) + [r["outputs"]]
            if len(layers) != len(r["indices"]):
                raise ValueError(f"{len(layers)} decoder layers but {len(r['indices'])} matchings")
            n_aux = len(layers) - 1
            for li, (o, (q, t)) in enumerate(zip(layers, r["indices"])):
                suffix = "" if li == n_aux else f"_{li}"
                for k, v in self._layer_losses(o["pred_logits"], o["pred_boxes"], r["target"], q, t).items():
                    total[k + suffix] = total.get(k + suffix, 0.0) + v
        return {
            k: v * self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] / num_boxes
            for k, v in total.items()
        }
