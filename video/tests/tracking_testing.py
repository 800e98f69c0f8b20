"""Helpers shared by the tracking tests: crowded random boxes and a stand-in for ``frame_forward``."""

import torch


def random_boxes(generator, n, spread=60.0):
    """(n, 4) XYXY boxes, corners in [0, spread), sides 8-28: crowded enough for many overlaps."""
    xy = torch.rand(n, 2, generator=generator) * spread
    return torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=generator) * 20], 1)


class FadingTrackStandIn:
    """Stand-in for ``QueryTracker.frame_forward``: detect query 0 sees one object at ``det_box`` (cxcywh in
    [0, 1]) every frame with score ~1, the other detect queries and every track query score ~0 (a track
    query that lost its object). Track queries predict ``track_box``, or their own reference box if None.
    Keeps every output dict in ``outputs``."""

    def __init__(self, model, det_box, track_box=None):
        self.model, self.det_box = model, torch.tensor(det_box)
        self.track_box = None if track_box is None else torch.tensor(track_box)
        self.outputs = []

    def __call__(self, images, tracks, hidden=None):
        m = self.model
        T_, Q, C = tracks[0].shape[0], m.num_detect_queries, m.hidden_dim
        logits = torch.full((T_ + Q, m.num_classes), -9.0)
        logits[T_, 0] = 9.0
        track_boxes = tracks[2] if self.track_box is None else self.track_box.repeat(T_, 1)
        out = {
            "pred_logits": logits,
            "pred_boxes": torch.cat([track_boxes, self.det_box.repeat(Q, 1)]),
            "aux_outputs": [],
            "num_tracks": T_,
        }
        out.update({k: torch.randn(T_ + Q, C) for k in ("hs", "tgt", "query_pos")})
        self.outputs.append(out)
        return out
