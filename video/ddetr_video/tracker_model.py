"""``QueryTracker``: Deformable DETR carrying one decoder query per object from frame to frame (MOTR-style).

Per frame the encoder runs once; the decoder gets two query groups, ``[T track queries] + [Q detect
queries]``, assembled by the detector's ``assemble_query_groups`` (in training the groups see each other, as
in MOTR; at inference the detect queries do not see the tracks by default, below):

* a track query is ``(tgt, query_pos, reference box)`` produced by the :class:`QueryInteractionModule` from
  the previous frame's decoder output of that track, its query_pos and its refined box (cx, cy, w, h) in
  [0, 1];
* a detect query is the detector's ``query_embed`` split (query_pos, tgt) with its reference point
  ``sigmoid(transformer.reference_points(query_pos))`` lifted to a box by a learned per-query size
  (``detect_ref_wh``), so tracks and detections share one (N, T + Q, 4) reference tensor.

With MOTR's rule the decoder's self-attention lets a track query suppress the detect queries on the same
object; ``frame_forward(..., hidden=)`` masks the tracks the runtime association names
(``DETECT_SEES_TRACKS``: by default every track, so the detect queries give the per-frame detector's outputs).
The class subclasses ``DeformableDETR`` and extends its ``from_config``, so parameter names are unchanged and
detector checkpoints load into it; ``criterion`` is a :class:`ClipCriterion` wrapping the detector's
``SetCriterion``.

Training input: a list of clips ``{"clip": [frame dicts]}`` (see :mod:`ddetr_video.clip_mapper`); the loss is
the :class:`ClipCriterion` collective average. Inference input: frames of one or more videos *in order*, one
dict per call or several of the same video; the track state resets when ``sequence`` changes or ``frame_idx``
does not increase. Output per frame: ``{"instances": Instances(pred_boxes, scores, pred_classes, track_ids)}``
in the original image size. Association is ``build_tracker(cfg)`` (``MODEL.TRACKER.ASSOCIATION``): query
propagation (``RuntimeTracker``) or, on the same weights, the detect queries alone + ``IoUTracker``.
Scores are one per query (its best class; see :func:`ddetr_video.tracking.query_instances`).
"""

import dataclasses
import math

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from torch import nn
from torchvision.ops import box_convert, box_iou

from ddetr_d2.errors import ConfigError
from ddetr_d2.modeling.meta_arch import DeformableDETR
from ddetr_d2.modeling.query_groups import QueryGroup, assemble_query_groups

from .clip_criterion import FALSE_POSITIVE, NO_OBJECT, ClipCriterion
from .qim import QueryInteractionModule
from .track_attention import TrackSelfAttention, attach_track_attention
from .tracking import associate_detections, build_tracker, query_instances

__all__ = ["QueryTracker"]

REFERENCES = ("box", "point")  # MODEL.TRACKER.REFERENCE
FAKE_TRACKS = ("near_track", "top_score")  # MODEL.TRACKER.FAKE_TRACKS


@META_ARCH_REGISTRY.register()
class QueryTracker(DeformableDETR):
    """
    Args (besides ``DeformableDETR``'s):
        tracker: runtime association (``build_tracker(cfg)``).
        qim_dim_feedforward, qim_dropout, qim_update_query_pos, qim_residual, qim_init:
            :class:`QueryInteractionModule` settings.
        extra_track_attn: MOTR's extra self-attention among the track queries before each decoder layer's
            self-attention (:mod:`ddetr_video.track_attention`); ``extra_track_attn_dropout`` its dropout.
        random_drop: probability to drop a matched track query for the next training frame.
        fp_ratio, fp_max: probability per training frame to add up to ``fp_max`` fake tracks.
        train_track_iou: in training, a query matched this frame (old track or new detection) is carried to
            the next frame only if its box IoU with its target is above this (MOTR: 0.5); <= 0: no gate.
        min_box_area: reported boxes smaller than this (pixels^2, original image) are left out.
        fake_tracks: "near_track" (MOTR) or "top_score", see :meth:`_fake_tracks`.
        keep_absent_tracks: in training, keep the track of an object absent from a frame ("no object" target,
            re-bound when the object returns) until its ``max_age``-th consecutive absence (MOTR); False: drop
            it at its first absence.
        max_age: see ``keep_absent_tracks`` (``MODEL.TRACKER.MAX_AGE``, the inference meaning).
        reference: ``"box"``: every query's decoder reference is a box (cx, cy, w, h), detect queries get a
            learned size (``detect_ref_wh``); ``"point"`` (MOTR): reference points (cx, cy), a track's is its
            last box centre.
        report_threshold: reported boxes need a score above this (MOTR's ``prob_threshold``; 0: every
            shown track / association output is reported).
    """

    @configurable
    def __init__(
        self,
        *,
        tracker,
        qim_dim_feedforward,
        qim_dropout=0.0,
        qim_update_query_pos=True,
        qim_residual="previous_query",
        qim_init="xavier",
        extra_track_attn=False,
        extra_track_attn_dropout=0.0,
        random_drop=0.0,
        fp_ratio=0.0,
        fp_max=0,
        train_track_iou=0.0,
        min_box_area=0.0,
        fake_tracks="near_track",
        keep_absent_tracks=True,
        max_age=5,
        reference="box",
        report_threshold=0.0,
        **detector_kwargs,
    ):
        super().__init__(**detector_kwargs)
        if self.two_stage:
            raise ConfigError(
                "QueryTracker needs learned detect queries: set MODEL.DEFORMABLE_DETR.TWO_STAGE False"
            )
        if len(self.training_groups):
            raise ConfigError(
                f"QueryTracker does not train extra query groups ({list(self.training_groups)}): disable them"
            )
        C, Q = self.transformer.d_model, self.num_queries
        self.hidden_dim, self.num_detect_queries = C, Q
        # built after the detector's heads, so a seed gives the same initialisation as before
        self.qim = QueryInteractionModule(
            C,
            self.transformer.nhead,
            qim_dim_feedforward,
            qim_dropout,
            qim_update_query_pos,
            residual=qim_residual,
            init=qim_init,
        )
        if reference not in REFERENCES:
            raise ConfigError(f"MODEL.TRACKER.REFERENCE must be 'box' or 'point', got {reference!r}")
        self.reference = reference
        # learned initial box size of each detect query, logits; starts at 0.1 of the image
        if reference == "box":
            self.detect_ref_wh = nn.Parameter(torch.full((Q, 2), math.log(0.1 / 0.9)))
        self.track_attn = None
        if extra_track_attn:
            layers = self.transformer.decoder.layers
            self.track_attn = nn.ModuleList(
                TrackSelfAttention(C, self.transformer.nhead, extra_track_attn_dropout) for _ in layers
            )
            attach_track_attention(layers, self.track_attn)
        self.random_drop = random_drop
        self.fp_ratio, self.fp_max = fp_ratio, fp_max
        self.train_track_iou = train_track_iou
        self.min_box_area = min_box_area
        if fake_tracks not in FAKE_TRACKS:
            raise ConfigError(
                f"MODEL.TRACKER.FAKE_TRACKS must be 'near_track' or 'top_score', got {fake_tracks!r}"
            )
        self.fake_tracks = fake_tracks
        self.keep_absent_tracks = keep_absent_tracks
        self.max_age = max_age
        self.report_threshold = report_threshold
        self.tracker = tracker
        self.reset_tracks()

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        tc = cfg.MODEL.TRACKER
        ret["criterion"] = ClipCriterion(
            ret["criterion"],
            min_birth_visibility=tc.MIN_BIRTH_VISIBILITY,
            match_empty_tracks=tc.FAKE_TRACKS == "near_track",
            count_absent_tracks=tc.LOSS_COUNTS_ABSENT_TRACKS,
        )
        ret.update(
            tracker=build_tracker(cfg),
            qim_dim_feedforward=tc.QIM_DIM_FEEDFORWARD,
            qim_dropout=tc.QIM_DROPOUT,
            qim_update_query_pos=tc.QIM_UPDATE_QUERY_POS,
            qim_residual=tc.QIM_RESIDUAL,
            qim_init=tc.QIM_INIT,
            extra_track_attn=tc.EXTRA_TRACK_ATTN,
            extra_track_attn_dropout=cfg.MODEL.DEFORMABLE_DETR.DROPOUT,
            random_drop=tc.RANDOM_DROP,
            fp_ratio=tc.FP_RATIO,
            fp_max=tc.FP_MAX,
            train_track_iou=tc.TRAIN_TRACK_IOU,
            min_box_area=tc.MIN_BOX_AREA,
            fake_tracks=tc.FAKE_TRACKS,
            keep_absent_tracks=tc.KEEP_ABSENT_TRACKS,
            max_age=tc.MAX_AGE,
            reference=tc.REFERENCE,
            report_threshold=tc.REPORT_THRESHOLD,
        )
        return ret

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self):
        return self.query_embed.weight.device

    def reset_tracks(self):
        """Forget every track (inference); ids restart at 1."""
        self.tracker.reset()
        self._state = None
        self._video_key = None

    def _empty_tracks(self):
        z = torch.zeros(0, self.hidden_dim, device=self._device)
        return z, z.clone(), torch.zeros(0, 4, device=self._device)

    def frame_forward(self, images, tracks, hidden=None):
        """
        Run one frame (batch of 1 image) with ``tracks = (tgt (T, C), query_pos (T, C), ref (T, 4))``;
        ``hidden``: None or (T,) bool, track queries the detect queries may not attend to (inference).

        Returns a dict: ``pred_logits`` (T+Q, K), ``pred_boxes`` (T+Q, 4) cxcywh in [0, 1] of the unpadded
        image, ``aux_outputs`` (list of such dicts, earlier layers), ``hs`` (T+Q, C) last-layer embeddings,
        ``tgt`` (T+Q, C) the content queries fed to the decoder, ``query_pos`` (T+Q, C), ``num_tracks`` T.
        """
        if len(images) != 1:
            raise ValueError(f"QueryTracker runs one frame at a time per video, got a batch of {len(images)}")
        srcs, masks, pos_embeds = self.prepare_features(images)
        enc = self.transformer.forward_encoder(srcs, masks, pos_embeds)
        tgt_d, ref_d, pos_d, _, _ = self.transformer.prepare_queries(enc, self.query_embed.weight)
        t_tgt, t_pos, t_ref = tracks
        if self.reference == "box":
            ref_d = torch.cat([ref_d, self.detect_ref_wh.sigmoid()[None]], -1)
        else:
            t_ref = t_ref[:, :2]  # MOTR: a track's reference point is its last box centre
        T = t_tgt.shape[0]
        # an association that reports the per-frame detector's detections (QueryIoUTracker) hides every
        # track from the detect queries; training and MOTR's rule: all queries see each other
        if not self.training and not getattr(self.tracker, "detect_sees_tracks", True):
            hidden = torch.ones(T, dtype=torch.bool)
        queries = assemble_query_groups(
            [
                QueryGroup("track", t_tgt[None], t_pos[None], t_ref[None]),
                QueryGroup("detect", tgt_d, pos_d, ref_d),
            ]
        )
        if hidden is not None and bool(hidden.any()):  # detect -> hidden track, per query
            if hidden.shape != (T,):
                raise ValueError(
                    f"hidden must be ({T},) bool for {T} track queries, got {tuple(hidden.shape)}"
                )
            n = queries.content.shape[1]
            mask = torch.zeros((n, n), dtype=torch.bool, device=queries.content.device)
            mask[T:, :T] = hidden.to(mask.device)[None]
            queries = dataclasses.replace(queries, attn_mask=mask)
        self._set_track_attention(t_tgt.shape[0])
        try:
            hs, init_ref, inter_refs = self.transformer.forward_decoder(
                queries.content, queries.reference_points, queries.position, enc, queries.attn_mask
            )
        finally:
            self._set_track_attention(0)
        logits, coords = self.predict_from_decoder(hs, init_ref, inter_refs)
        layers = [{"pred_logits": a[0], "pred_boxes": b[0]} for a, b in zip(logits, coords)]
        out = dict(layers[-1])
        out["aux_outputs"] = layers[:-1] if self.aux_loss else []
        out["hs"] = hs[-1, 0]
        out["tgt"] = queries.content[0]
        out["query_pos"] = queries.position[0]
        out["num_tracks"] = t_tgt.shape[0]
        return out

    def _set_track_attention(self, num_tracks):
        """Tell the extra track-attention blocks (if any) how many queries at the front are tracks."""
        if self.track_attn is not None:
            for block in self.track_attn:
                block.num_tracks = num_tracks

    def _next_tracks(self, out, sel):
        sel = sel.to(out["hs"].device)
        prev_tgt = out["tgt"][sel] if self.qim.residual == "previous_query" else None
        return self.qim(out["hs"][sel], out["query_pos"][sel], out["pred_boxes"][sel], prev_tgt)

    def _target(self, frame, image_size):
        """The detector's target dict of one frame, plus ``track_ids`` (and ``visibility`` when annotated)."""
        inst = frame["instances"]
        target = self.prepare_targets([inst], [image_size])[0]
        target["track_ids"] = inst.gt_track_ids.to(self._device)
        if inst.has("gt_visibility"):
            target["visibility"] = inst.gt_visibility.to(self._device)
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
        misses = torch.zeros(0, dtype=torch.int64)
        records = []
        for frame in frames:
            images = self.preprocess_image([frame])
            target = self._target(frame, images.image_sizes[0])
            out = self.frame_forward(images, tracks)
            indices = self.criterion.match_frame(out, target, obj_ids)
            records.append({"outputs": out, "target": target, "indices": indices, "track_obj_ids": obj_ids})
            sel, obj_ids, misses = self._select_training_tracks(out, target, indices[-1], obj_ids, misses)
            tracks = self._next_tracks(out, sel)
        return self.criterion(records)

    def _select_training_tracks(self, out, target, final_match, obj_ids, misses):
        """
        Queries that become next frame's tracks: the matched ones whose box IoU with their target is above
        ``train_track_iou`` (MOTR's gate, old and new tracks), the tracks of absent objects (with
        ``keep_absent_tracks``; they passed the gate when last matched, as MOTR keeps their last IoU), minus
        random drops, plus fake tracks (``fake_tracks`` rule). A matched query failing the gate is not a
        fake either (it is "used").

        Args:
            final_match: (q, t) of the last decoder layer; obj_ids, misses: (T,) object id followed by each
                track slot and its count of consecutive frames without its object.
        Returns:
            (queries, their object ids, their miss counts) for the next frame, int64 on CPU.
        """
        q, t = final_match
        T = out["num_tracks"]
        matched = q.clone()
        if self.train_track_iou > 0 and q.numel():
            dev = out["pred_boxes"].device
            iou = box_iou(
                box_convert(out["pred_boxes"][q.to(dev)].detach(), "cxcywh", "xyxy"),
                box_convert(target["boxes"][t.to(dev)], "cxcywh", "xyxy"),
            ).diagonal()
            ok = (iou > self.train_track_iou).cpu()
            q, t = q[ok], t[ok]
        ids = target["track_ids"].cpu()[t]
        ages = torch.zeros(q.numel(), dtype=torch.int64)
        if self.keep_absent_tracks and T:
            # a slot following an object absent from this frame (an id'd slot whose object is present is
            # always matched): kept as "no object", re-bound by id when its object returns, dies at its
            # max_age-th consecutive absence (as RuntimeTracker at inference)
            absent = torch.ones(T, dtype=torch.bool)
            absent[matched[matched < T]] = False
            absent &= obj_ids >= 0
            age = misses + 1
            keep = torch.nonzero(absent & (age < self.max_age)).flatten()
            q, ids, ages = torch.cat([q, keep]), torch.cat([ids, obj_ids[keep]]), torch.cat([ages, age[keep]])
        used = torch.cat([matched, q])  # queries bound to an object this frame (gated, dropped or not)
        q, ids, ages = self._random_drop_tracks(q, ids, ages)
        fp = self._fake_tracks(out, q, ids, used)
        fake_id = NO_OBJECT if self.fake_tracks == "near_track" else FALSE_POSITIVE
        q = torch.cat([q, fp])
        ids = torch.cat([ids, torch.full((fp.numel(),), fake_id, dtype=torch.int64)])
        ages = torch.cat([ages, torch.zeros(fp.numel(), dtype=torch.int64)])
        return q, ids, ages

    def _random_drop_tracks(self, q, ids, ages):
        """Drop each candidate track with probability ``random_drop`` (it must be re-detected)."""
        if self.random_drop > 0 and q.numel():
            keep = torch.rand(q.numel()) >= self.random_drop
            q, ids, ages = q[keep], ids[keep], ages[keep]
        return q, ids, ages

    def _fake_tracks(self, out, q, ids, used):
        """
        Query indices added as fake tracks (trained to predict "no object"); ``used`` queries never are.

        ``"near_track"`` (MOTR's ``_add_fp_tracks``): for each kept track, with probability ``fp_ratio``, the
        unused query whose box overlaps it most (duplicates removed); they follow no object (id -1) and may be
        matched to a new object in the next frame. ``"top_score"``: with probability ``fp_ratio`` per frame,
        the ``fp_max`` best-scoring unused detect queries; they are "no object" for one frame (id -2).
        """
        T = out["num_tracks"]
        n_all = out["pred_logits"].shape[0]
        free = torch.ones(n_all, dtype=torch.bool)
        free[used] = False
        empty = torch.zeros(0, dtype=torch.int64)
        if self.fp_ratio <= 0:
            return empty
        if self.fake_tracks == "near_track":
            tracks = q[ids >= 0]
            chosen = tracks[torch.rand(tracks.numel()) < self.fp_ratio]
            cand = torch.nonzero(free).flatten()
            if chosen.numel() == 0 or cand.numel() == 0:
                return empty
            if chosen.numel() >= cand.numel():
                return cand
            boxes = box_convert(out["pred_boxes"].detach().cpu(), "cxcywh", "xyxy")
            nearest = box_iou(boxes[cand], boxes[chosen]).argmax(0)
            return cand[torch.unique(nearest)]
        if self.fp_max <= 0 or torch.rand(()) >= self.fp_ratio:
            return empty
        free[:T] = False  # detect queries only
        scores = out["pred_logits"].detach().sigmoid().max(-1).values.cpu()
        scores[~free] = -1.0
        n = min(self.fp_max, int(free.sum()))
        return scores.topk(n).indices if n > 0 else empty

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect(self, batched_inputs):
        """Frame-by-frame detection with the detect queries only (no tracks): the baseline's detector.

        Returns ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]`` per frame, one per detect
        query (scored by its best class), through ``detector_postprocess`` to the original image size.
        """
        results = []
        for frame in batched_inputs:
            images = self.preprocess_image([frame])
            size = images.image_sizes[0]
            out = self.frame_forward(images, self._empty_tracks())
            inst = query_instances(out["pred_logits"], out["pred_boxes"], size)
            results.append({"instances": detector_postprocess(inst, *self._out_size(frame, size))})
        return results

    @staticmethod
    def _out_size(frame, image_size):
        return frame.get("height", image_size[0]), frame.get("width", image_size[1])

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
            if self.tracker.uses_track_queries:
                results.append(self._track_frame(frame))
            else:
                inst = associate_detections(self.detect([frame])[0]["instances"], self.tracker)
                results.append({"instances": self._drop_small(inst)})
        return results

    def _drop_small(self, inst):
        """Leave out reported boxes under ``min_box_area`` or scored at most ``report_threshold``."""
        if self.min_box_area > 0:
            inst = inst[inst.pred_boxes.area() >= self.min_box_area]
        if self.report_threshold > 0:
            inst = inst[inst.scores > self.report_threshold]
        return inst

    def _track_frame(self, frame):
        images = self.preprocess_image([frame])
        size = images.image_sizes[0]
        tracks = self._state if self._state is not None else self._empty_tracks()
        hide = getattr(self.tracker, "hidden_from_detect", None)
        out = self.frame_forward(images, tracks, hidden=hide() if hide is not None else None)
        T = out["num_tracks"]
        inst = query_instances(out["pred_logits"], out["pred_boxes"], size)
        boxes = inst.pred_boxes.tensor
        up = self.tracker.update(inst.scores[:T], boxes[:T], inst.scores[T:], boxes[T:])
        self._state = self._next_tracks(out, up.sources(T))
        dev = boxes.device
        shown = inst[up.report_sources(T)[up.visible].to(dev)]
        shown.track_ids = up.ids[up.visible].to(dev)
        return {"instances": self._drop_small(detector_postprocess(shown, *self._out_size(frame, size)))}
