"""``QueryTracker``: Deformable DETR carrying one decoder query per object from frame to frame (MOTR-style).

Per frame the encoder runs once; the decoder gets ``[T track queries] + [Q learned detect queries]``:

* a track query is ``(tgt, query_pos, reference box)`` produced by the :class:`QueryInteractionModule` from
  the
  previous frame's decoder output of that track, its query_pos and its refined box (cx, cy, w, h) in [0, 1];
* a detect query is the detector's ``query_embed`` split (query_pos, tgt) with its reference point
  ``sigmoid(transformer.reference_points(query_pos))`` lifted to a box by a learned per-query size
  (``detect_ref_wh``), so tracks and detections share one (N, T + Q, 4) reference tensor.

Decoder self-attention lets a track query suppress the detect queries on the same object. Parameter names of
the detector are unchanged (the class subclasses ``DeformableDETR``), so detector checkpoints load into it.

Training input: a list of clips ``{"clip": [frame dicts]}`` (see :mod:`ddetr_video.clip_mapper`); the loss is
the :class:`ClipCriterion` collective average. Inference input: frames of one or more videos *in order*, one
dict per call or several of the same video; the track state resets when ``sequence`` changes or
``frame_idx`` does not increase. Output per frame: ``{"instances": Instances(pred_boxes, scores,
pred_classes, track_ids)}`` in the original image size.
"""

import math

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import box_convert, box_iou

from ddetr_d2.modeling.meta_arch import DeformableDETR

from .clip_criterion import FALSE_POSITIVE, ClipCriterion
from .qim import QueryInteractionModule
from .runtime_tracker import RuntimeTracker

__all__ = ["QueryTracker"]


@META_ARCH_REGISTRY.register()
class QueryTracker(DeformableDETR):
    def __init__(self, cfg):
        super().__init__(cfg)
        dc, tc = cfg.MODEL.DEFORMABLE_DETR, cfg.MODEL.TRACKER
        if dc.TWO_STAGE:
            raise ValueError(
                "QueryTracker needs learned detect queries: set MODEL.DEFORMABLE_DETR.TWO_STAGE False"
            )
        C, Q = dc.HIDDEN_DIM, dc.NUM_QUERIES
        self.hidden_dim, self.num_detect_queries = C, Q
        self.num_classes = dc.NUM_CLASSES
        self.use_aux = dc.AUX_LOSS
        self.qim = QueryInteractionModule(
            C, dc.NHEADS, tc.QIM_DIM_FEEDFORWARD, tc.QIM_DROPOUT, tc.QIM_UPDATE_QUERY_POS
        )
        # learned initial box size of each detect query, logits; starts at 0.1 of the image
        self.detect_ref_wh = nn.Parameter(torch.full((Q, 2), math.log(0.1 / 0.9)))
        self.clip_criterion = ClipCriterion(
            dc.NUM_CLASSES,
            cost_class=dc.COST_CLASS,
            cost_bbox=dc.COST_BBOX,
            cost_giou=dc.COST_GIOU,
            class_weight=dc.CLASS_WEIGHT,
            bbox_weight=dc.BBOX_WEIGHT,
            giou_weight=dc.GIOU_WEIGHT,
            focal_alpha=dc.FOCAL_ALPHA,
            focal_gamma=dc.FOCAL_GAMMA,
            min_birth_visibility=tc.MIN_BIRTH_VISIBILITY,
        )
        self.random_drop = tc.RANDOM_DROP
        self.fp_ratio, self.fp_max = tc.FP_RATIO, tc.FP_MAX
        self.min_track_iou = tc.MIN_TRACK_IOU
        self.min_box_area = tc.MIN_BOX_AREA
        self.runtime = RuntimeTracker(
            tc.BIRTH_THRESHOLD,
            tc.KEEP_THRESHOLD,
            tc.MAX_AGE,
            tc.DUPLICATE_IOU,
            tc.TRACK_DUPLICATE_IOU if tc.TRACK_DUPLICATE_IOU > 0 else None,
        )
        self.reset_tracks()

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self):
        return self.query_embed.weight.device

    def reset_tracks(self):
        """Forget every track (inference); ids restart at 1."""
        self.runtime.reset()
        self._state = None
        self._video_key = None

    def _empty_tracks(self):
        z = torch.zeros(0, self.hidden_dim, device=self._device)
        return z, z.clone(), torch.zeros(0, 4, device=self._device)

    def _images(self, frames):
        """Normalised, padded ImageList of a list of frame dicts."""
        return self.preprocess_image(frames)

    def frame_forward(self, images, tracks):
        """
        Run one frame (batch of 1 image) with ``tracks = (tgt (T, C), query_pos (T, C), ref (T, 4))``.

        Returns a dict: ``pred_logits`` (T+Q, K), ``pred_boxes`` (T+Q, 4) cxcywh in [0, 1] of the unpadded
        image, ``aux_outputs`` (list of such dicts, earlier layers), ``hs`` (T+Q, C) last-layer embeddings,
        ``query_pos`` (T+Q, C), ``num_tracks`` T.
        """
        if len(images) != 1:
            raise ValueError(f"QueryTracker runs one frame at a time per video, got a batch of {len(images)}")
        srcs, masks, pos_embeds = self.prepare_features(images)
        enc = self.transformer.forward_encoder(srcs, masks, pos_embeds)
        tgt_d, ref_d, pos_d, _, _ = self.transformer.prepare_queries(enc, self.query_embed.weight)
        ref_d = torch.cat([ref_d, self.detect_ref_wh.sigmoid()[None]], -1)
        t_tgt, t_pos, t_ref = tracks
        tgt = torch.cat([t_tgt[None], tgt_d], 1)
        query_pos = torch.cat([t_pos[None], pos_d], 1)
        ref = torch.cat([t_ref[None], ref_d], 1)
        hs, init_ref, inter_refs = self.transformer.forward_decoder(tgt, ref, query_pos, enc)
        logits, coords = self.predict_from_decoder(hs, init_ref, inter_refs)
        layers = [{"pred_logits": a[0], "pred_boxes": b[0]} for a, b in zip(logits, coords)]
        out = dict(layers[-1])
        out["aux_outputs"] = layers[:-1] if self.use_aux else []
        out["hs"] = hs[-1, 0]
        out["query_pos"] = query_pos[0]
        out["num_tracks"] = t_tgt.shape[0]
        return out

    def _next_tracks(self, out, sel):
        sel = sel.to(out["hs"].device)
        return self.qim(out["hs"][sel], out["query_pos"][sel], out["pred_boxes"][sel])

    @staticmethod
    def _target(frame, image_size, device):
        inst = frame["instances"]
        h, w = image_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        boxes = inst.gt_boxes.tensor.to(device) / scale
        target = {
            "labels": inst.gt_classes.to(device),
            "boxes": box_convert(boxes, "xyxy", "cxcywh"),
            "track_ids": inst.gt_track_ids.to(device),
        }
        if inst.has("gt_visibility"):
            target["visibility"] = inst.gt_visibility.to(device)
        return target

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs):
        if self.training:
            return self.forward_clips(batched_inputs)
        return self.track(batched_inputs)

    def forward_clips(self, batched_inputs):
        """batched_inputs: list of ``{"clip": [frame dicts]}`` -> dict of losses averaged over the clips."""
        total = {}
        for clip in batched_inputs:
            if "clip" not in clip:
                raise KeyError("QueryTracker training expects {'clip': [...]} inputs (use ClipDatasetMapper)")
            losses = self._clip_losses(clip["clip"])
            for k, v in losses.items():
                total[k] = total.get(k, 0.0) + v / len(batched_inputs)
        return total

    def _clip_losses(self, frames):
        tracks = self._empty_tracks()
        obj_ids = torch.zeros(0, dtype=torch.int64)
        records = []
        for frame in frames:
            images = self._images([frame])
            target = self._target(frame, images.image_sizes[0], self._device)
            out = self.frame_forward(images, tracks)
            indices = self.clip_criterion.match_frame(out, target, obj_ids)
            records.append({"outputs": out, "target": target, "indices": indices})
            sel, obj_ids = self._select_training_tracks(out, target, indices[-1], obj_ids)
            tracks = self._next_tracks(out, sel)
        return self.clip_criterion(records)

    def _select_training_tracks(self, out, target, final_match, obj_ids):
        """Queries that become next frame's tracks: matched ones (minus random drops) + fake positives."""
        q, t = final_match
        T = out["num_tracks"]
        if self.min_track_iou > 0 and q.numel():
            dev = out["pred_boxes"].device
            iou = box_iou(
                box_convert(out["pred_boxes"][q.to(dev)].detach(), "cxcywh", "xyxy"),
                box_convert(target["boxes"][t.to(dev)], "cxcywh", "xyxy"),
            ).diagonal()
            ok = ((iou >= self.min_track_iou) | (q.to(dev) < T)).cpu()
            q, t = q[ok], t[ok]
        ids = target["track_ids"].cpu()[t]
        if self.random_drop > 0 and q.numel():
            keep = torch.rand(q.numel()) >= self.random_drop
            q, ids = q[keep], ids[keep]
        if self.fp_ratio > 0 and self.fp_max > 0 and torch.rand(()) < self.fp_ratio:
            scores = out["pred_logits"][T:].detach().sigmoid().max(-1).values.cpu()
            used = torch.zeros(scores.numel(), dtype=torch.bool)
            used[(q[q >= T] - T)] = True
            scores[used] = -1.0
            n = min(self.fp_max, int((~used).sum()))
            if n > 0:
                fp = scores.topk(n).indices + T
                q = torch.cat([q, fp])
                ids = torch.cat([ids, torch.full((n,), FALSE_POSITIVE, dtype=torch.int64)])
        return q, ids

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect(self, batched_inputs):
        """Frame-by-frame detection with the detect queries only (no tracks): the baseline detector.

        Returns ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]`` per frame (one score per
        query: its best class), in the original image size.
        """
        results = []
        for frame in batched_inputs:
            images = self._images([frame])
            out = self.frame_forward(images, self._empty_tracks())
            scores, classes = out["pred_logits"].sigmoid().max(-1)
            boxes = self._to_original(out["pred_boxes"], frame, images.image_sizes[0])
            inst = Instances(self._out_size(frame, images.image_sizes[0]))
            inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(boxes), scores, classes
            results.append({"instances": inst})
        return results

    @staticmethod
    def _out_size(frame, image_size):
        return frame.get("height", image_size[0]), frame.get("width", image_size[1])

    @classmethod
    def _to_original(cls, boxes_cxcywh, frame, image_size):
        h, w = cls._out_size(frame, image_size)
        xyxy = box_convert(boxes_cxcywh, "cxcywh", "xyxy")
        return xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)

    @torch.no_grad()
    def track(self, batched_inputs):
        """Track frame by frame (state kept across calls); see the module docstring."""
        results = []
        for frame in batched_inputs:
            key = frame.get("sequence", None)
            fidx = frame.get("frame_idx", None)
            if (
                self._video_key is None
                or key != self._video_key[0]
                or (fidx is not None and self._video_key[1] is not None and fidx <= self._video_key[1])
            ):
                self.reset_tracks()
            self._video_key = (key, fidx)
            results.append(self._track_frame(frame))
        return results

    def _track_frame(self, frame):
        images = self._images([frame])
        tracks = self._state if self._state is not None else self._empty_tracks()
        out = self.frame_forward(images, tracks)
        T = out["num_tracks"]
        scores, classes = out["pred_logits"].sigmoid().max(-1)
        boxes = self._to_original(out["pred_boxes"], frame, images.image_sizes[0])
        up = self.runtime.update(scores[:T], boxes[:T], scores[T:], boxes[T:])
        sel = torch.cat([up.keep, up.births + T])
        self._state = self._next_tracks(out, sel)
        dev = boxes.device
        show = sel[up.visible].to(dev)
        ids = up.ids[up.visible].to(dev)
        b = boxes[show]
        if self.min_box_area > 0:
            big = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= self.min_box_area
            show, ids, b = show[big], ids[big], b[big]
        inst = Instances(self._out_size(frame, images.image_sizes[0]))
        inst.pred_boxes = Boxes(b)
        inst.scores = scores[show]
        inst.pred_classes = classes[show]
        inst.track_ids = ids
        return {"instances": inst}
