"""Set criterion of Deformable DETR: sigmoid focal classification loss, L1 and GIoU box losses."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["SetCriterion", "sigmoid_focal_loss"]


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha=0.25, gamma=2.0):
    """
    Official normalisation: element-wise focal loss, mean over queries, sum over the rest, / num_boxes.
    Args:
        inputs, targets: (N, Q, K) logits and {0, 1} targets.
    Returns:
        scalar.
    """
    loss = torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


class SetCriterion(nn.Module):
    """
    Matches every decoder layer's output to the targets (own matching per layer) and returns the
    weighted losses ``loss_ce`` (focal x num_queries), ``loss_bbox`` (L1), ``loss_giou``, with suffix
    ``_i`` for the auxiliary layers and ``_enc`` for two-stage proposals (class-agnostic targets;
    left out with ``enc_loss=False``, as the official code does without auxiliary losses).
    ``weight_dict`` holds the base keys; a suffixed key takes its base key's weight.
    """

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0, enc_loss=True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.enc_loss = enc_loss

    @staticmethod
    def _src_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        b, s = self._src_idx(indices)
        b, s = b.to(logits.device), s.to(logits.device)
        target_onehot = torch.zeros_like(logits)
        if len(b):
            labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
            target_onehot[b, s, labels] = 1.0
        loss = sigmoid_focal_loss(logits, target_onehot, num_boxes, self.focal_alpha, self.focal_gamma)
        return {"loss_ce": loss * logits.shape[1]}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        b, s = self._src_idx(indices)
        pred = outputs["pred_boxes"][b.to(outputs["pred_boxes"].device), s.to(outputs["pred_boxes"].device)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(pred)
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(
            generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _layer_losses(self, outputs, targets, num_boxes, suffix="", indices=None):
        """Unweighted losses of one layer's ``outputs``; Hungarian matching unless ``indices`` are given."""
        if indices is None:
            indices = self.matcher(outputs, targets)
        losses = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    @staticmethod
    def get_num_boxes(targets, device):
        """Average number of target boxes per worker (all-reduced), clamped to >= 1."""
        num_boxes = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            dist.all_reduce(num_boxes)
        return torch.clamp(num_boxes / world_size, min=1).item()

    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with ``pred_logits`` (N, Q, K), ``pred_boxes`` (N, Q, 4) cxcywh, optional
                ``aux_outputs`` (list of such dicts) and ``enc_outputs`` (dict).
            targets: list of N dicts with ``labels`` (T_i,) int64, ``boxes`` (T_i, 4) normalised cxcywh.
        Returns:
            dict of weighted losses.
        """
        num_boxes = self.get_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._layer_losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs and self.enc_loss:
            bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            losses.update(self._layer_losses(outputs["enc_outputs"], bin_targets, num_boxes, "_enc"))
        return self.apply_weights(losses)

    def weight_of(self, key):
        """Weight of a loss key: its own entry, else that of the base key it extends (``loss_ce_dn_0``)."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        for base, w in self.weight_dict.items():
            if key.startswith(base + "_"):
                return w
        raise KeyError(f"no weight for loss {key!r} in {sorted(self.weight_dict)}")

    def apply_weights(self, losses):
        return {k: v * self.weight_of(k) for k, v in losses.items()}
