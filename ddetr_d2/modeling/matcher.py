"""Hungarian matching between queries and ground truth (focal class cost, L1, GIoU)."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment minimising ``cost_class * focal_cost + cost_bbox * L1 + cost_giou * (-GIoU)``
    per image (scipy ``linear_sum_assignment``; the costs of the whole batch are computed at once).
    The class cost is the official focal cost:
    ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at the target class.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits, pred_boxes, tgt_ids, tgt_boxes):
        """
        Args:
            pred_logits: (Q, K) logits; pred_boxes: (Q, 4) cxcywh in [0, 1];
            tgt_ids: (T,) int64; tgt_boxes: (T, 4) cxcywh.
        Returns:
            (Q, T) cost.
        """
        prob = pred_logits.sigmoid()
        neg = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        pos = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with ``pred_logits`` (N, Q, K) and ``pred_boxes`` (N, Q, 4) cxcywh.
            targets: list of N dicts with ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) cxcywh normalised.
        Returns:
            list of N (query_idx, target_idx) int64 tensor pairs of length min(Q, T_i).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} predictions")
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]
        # one cost matrix for the whole batch (every query vs every target, as the official code), then
        # each image's block: the same per-pair values as per image, in a few large ops instead of N sets
        n, q = logits.shape[:2]
        c = self.cost_matrix(
            logits.flatten(0, 1).float(),
            boxes.flatten(0, 1).float(),
            torch.cat([t["labels"] for t in targets]),
            torch.cat([t["boxes"] for t in targets]).float(),
        )
        c = c.view(n, q, -1).cpu()
        indices, start = [], 0
        for i, size in enumerate(sizes):
            if size == 0:
                indices.append((empty, empty.clone()))
                continue
            row, col = linear_sum_assignment(c[i, :, start : start + size].numpy())
            start += size
            indices.append((torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return indices
