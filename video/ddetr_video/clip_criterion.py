"""Tracklet-aware label assignment and the collective-average clip loss (MOTR's ClipMatcher idea).

Per frame, the decoder queries are ``[T track queries] + [Q detect queries]``:

* track query ``i`` follows object id ``track_obj_ids[i]``: its target is that object's box in this frame,
  or *no object* when the id is absent (object left / occluded) or when the query is an injected false
  positive (id ``-2``) / an empty slot (``-1``; with ``match_empty_tracks``, as MOTR's fake tracks, an empty
  slot is matched like a detect query);
* detect queries are matched by the detector's :class:`~ddetr_d2.modeling.matcher.HungarianMatcher` (focal
  class cost + L1 + GIoU) **only** to objects whose id no track query follows and whose visibility (if the
  target has one) is at least ``min_birth_visibility`` (a fully occluded object cannot be *detected*, only
  *kept* by its track); every other detect query targets no object.

The losses are the detector's :class:`~ddetr_d2.modeling.criterion.SetCriterion` ones (``loss_labels``:
torchvision's sigmoid focal loss, ``loss_boxes``: L1 and GIoU; the same for each auxiliary decoder layer),
*summed* over all frames of the clip, each divided by the number of ground-truth objects in the whole clip
(all-reduced over processes, as ``SetCriterion.get_num_boxes``), then weighted by its ``weight_dict``.

Boxes are (cx, cy, w, h) normalised to [0, 1] by the unpadded image size, as in the detector.
"""

import torch
from torch import nn

__all__ = ["ClipCriterion", "NO_OBJECT", "FALSE_POSITIVE"]

NO_OBJECT = -1
FALSE_POSITIVE = -2


class ClipCriterion(nn.Module):
    """
    Args:
        set_criterion: the detector's ``SetCriterion`` (built by ``DeformableDETR.from_config``): its
            ``matcher`` assigns the detect queries, its ``loss_labels`` / ``loss_boxes`` give each frame's
            losses, ``get_num_boxes`` the normaliser and ``weight_dict`` the weights.
        min_birth_visibility: objects less visible than this are not targets of detect queries.
        match_empty_tracks: track slots following no object (id -1, e.g. MOTR's fake tracks) join the detect
            queries in the Hungarian matching, so they can pick up a new object (MOTR); False: they target
            "no object".
        count_absent_tracks: the loss normaliser also counts the track slots whose object is absent from
            their frame (MOTR's ``num_samples``: objects + disappeared tracks); False: objects only.
    """

    def __init__(
        self, set_criterion, min_birth_visibility=0.0, match_empty_tracks=False, count_absent_tracks=False
    ):
        super().__init__()
        self.set_criterion = set_criterion
        self.count_absent_tracks = count_absent_tracks
        self.min_birth_visibility = min_birth_visibility
        self.match_empty_tracks = match_empty_tracks

    @property
    def matcher(self):
        return self.set_criterion.matcher

    # ------------------------------------------------------------------ matching
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
        if self.match_empty_tracks:
            empty = torch.nonzero(track_obj_ids.cpu() == NO_OBJECT).flatten()
            cand = torch.cat([empty, torch.arange(T, logits.shape[0])])
        else:
            cand = torch.arange(T, logits.shape[0])
        c_dev = cand.to(logits.device)
        r, c = self.matcher(
            {"pred_logits": logits[c_dev][None], "pred_boxes": boxes[c_dev][None]},
            [{"labels": target["labels"][free.to(dev)], "boxes": target["boxes"][free.to(dev)]}],
        )[0]
        q = torch.cat([torch.as_tensor(q_idx, dtype=torch.int64), cand[r]])
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
    def _layer_losses(self, outputs, target, indices, num_boxes):
        """The detector's losses of one decoder layer of one frame (a batch of one image)."""
        one = {"pred_logits": outputs["pred_logits"][None], "pred_boxes": outputs["pred_boxes"][None]}
        losses = self.set_criterion.loss_labels(one, [target], [indices], num_boxes)
        losses.update(self.set_criterion.loss_boxes(one, [target], [indices], num_boxes))
        return losses

    @staticmethod
    def _num_absent(record):
        """Track slots following an object id (>= 0) that is not among the frame's targets."""
        ids = record.get("track_obj_ids")
        if ids is None or ids.numel() == 0:
            return 0
        present = set(record["target"]["track_ids"].cpu().tolist())
        return sum(1 for i in ids.tolist() if i >= 0 and i not in present)

    def forward(self, records):
        """
        Args:
            records: list over the frames of a clip (or of several clips) of dicts with "outputs", "target"
                and "indices" (as returned by :meth:`match_frame`).
        Returns:
            dict of weighted losses ``loss_ce, loss_bbox, loss_giou`` and ``_{i}`` suffixes for aux layers,
            each summed over frames and divided by the number of objects in all frames (all-reduced, >= 1).
        """
        if not records:
            raise ValueError("ClipCriterion needs at least one frame record")
        device = records[0]["outputs"]["pred_logits"].device
        counted = [r["target"] for r in records]
        if self.count_absent_tracks:
            # each absent track slot counts as one more sample (get_num_boxes counts "labels" entries)
            counted += [{"labels": torch.zeros(self._num_absent(r))} for r in records]
        num_boxes = self.set_criterion.get_num_boxes(counted, device)
        total = {}
        for r in records:
            layers = list(r["outputs"].get("aux_outputs", [])) + [r["outputs"]]
            if len(layers) != len(r["indices"]):
                raise ValueError(f"{len(layers)} decoder layers but {len(r['indices'])} matchings")
            n_aux = len(layers) - 1
            for li, (o, qt) in enumerate(zip(layers, r["indices"])):
                suffix = "" if li == n_aux else f"_{li}"
                for k, v in self._layer_losses(o, r["target"], qt, num_boxes).items():
                    total[k + suffix] = total.get(k + suffix, 0.0) + v
        return self.set_criterion.apply_weights(total)
