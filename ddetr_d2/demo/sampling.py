"""
Sampling points of the last decoder layer's deformable cross-attention: recording, mapping to image
pixels and drawing (cf. Fig. 6 of the Deformable DETR paper).

:class:`SamplingRecorder` owns forward hooks on that ``MSDeformAttn``: a pre-hook captures the
reference points (N, Len_q, levels, 2 or 4) and feature map sizes (levels, 2) of the call, forward
hooks on its ``sampling_offsets`` / ``attention_weights`` projections capture their outputs, and
:func:`sampling_locations` turns them into locations (N, Len_q, heads, levels, points, 2) with the
op's formula. Locations are (x, y) normalised to the padded network input (the ``ImageList``
tensor). Pre-hooks on the model and its backbone capture the resized, unpadded input size (from
``batched_inputs``) and the padded input size. The op itself keeps no state.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "LEVEL_COLORS_BGR",
    "SamplingRecord",
    "DetectionSampling",
    "SamplingRecorder",
    "find_last_cross_attn",
    "sampling_locations",
    "normalized_to_image_coords",
    "points_inside",
    "draw_sampling_points",
    "draw_level_legend",
    "make_panel_grid",
]

# One colour per feature level (BGR): red, green, blue, orange, magenta, cyan.
LEVEL_COLORS_BGR = [
    (40, 40, 230),
    (60, 190, 60),
    (230, 110, 30),
    (0, 170, 255),
    (200, 60, 200),
    (200, 200, 0),
]


def find_last_cross_attn(model):
    """The deformable cross-attention of the last decoder layer (``transformer.decoder.layers[-1]``)."""
    from ddetr_d2.ops.ms_deform_attn import MSDeformAttn

    try:
        attn = model.transformer.decoder.layers[-1].cross_attn
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(
            f"{type(model).__name__} has no transformer.decoder.layers[-1].cross_attn; "
            "sampling points need a DeformableDETR model"
        ) from e
    if not isinstance(attn, MSDeformAttn):
        raise ValueError(f"the last decoder layer's cross_attn is a {type(attn).__name__}, not MSDeformAttn")
    return attn


def sampling_locations(reference_points, sampling_offsets, spatial_shapes, n_points):
    """
    The sampling locations ``MSDeformAttn`` reads, from its inputs and its offset projection's output.

    Args:
        reference_points: (N, Len_q, L, 2) points (x, y), or (N, Len_q, L, 4) boxes (cx, cy, w, h),
            normalised to the padded input.
        sampling_offsets: (N, Len_q, M, L, P, 2) output of ``sampling_offsets`` (level pixels for
            points; fractions of half the box size times P for boxes).
        spatial_shapes: (L, 2) feature map sizes (H_l, W_l).
        n_points: P.
    Returns:
        (N, Len_q, M, L, P, 2) (x, y) normalised to the padded input.
    """
    ref = reference_points[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
        wh = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(sampling_offsets)
        return ref + sampling_offsets / wh[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        return ref[..., :2] + sampling_offsets / n_points * ref[..., 2:] * 0.5
    raise ValueError(f"reference_points last dim must be 2 or 4, got shape {tuple(reference_points.shape)}")


def normalized_to_image_coords(locations, padded_hw, input_hw, image_hw):
    """
    Map (x, y) locations normalised to the padded network input to pixel coordinates of the original image.

    The network input is the original image resized to ``input_hw`` (H_in, W_in) and zero-padded at the
    bottom/right to ``padded_hw`` (H_pad, W_pad). A normalised x covers the padded width, so its input
    pixel is ``x * W_pad``; the resize is undone with ``W_img / W_in`` (as ``detector_postprocess`` does
    for boxes). Coordinates are continuous: (0, 0) is the top-left corner of the top-left pixel.

    Args:
        locations: array or tensor (..., 2), (x, y) in [0, 1] of the padded input.
        padded_hw: (H, W), or an array (..., 2) of (H, W) broadcastable against ``locations``.
        input_hw, image_hw: (H, W) pairs.
    Returns:
        float64 numpy array (..., 2) of (x, y) in original image pixels.
    """
    if isinstance(locations, torch.Tensor):
        locations = locations.detach().cpu().numpy()
    locations = np.asarray(locations, dtype=np.float64)
    if locations.shape[-1] != 2:
        raise ValueError(f"locations must end with a dimension of 2 (x, y), got shape {locations.shape}")
    padded = np.asarray(padded_hw, dtype=np.float64)
    (h_in, w_in), (h_img, w_img) = input_hw, image_hw
    if np.any(padded[..., 0] < h_in) or np.any(padded[..., 1] < w_in):
        raise ValueError(f"input size {tuple(input_hw)} is larger than the padded size {padded.tolist()}")
    scale = np.stack([padded[..., 1] * (w_img / w_in), padded[..., 0] * (h_img / h_in)], -1)
    return locations * scale


def points_inside(points_xy, image_hw):
    """Boolean mask (...) of the (x, y) points inside an image of size (H, W): 0 <= x < W and 0 <= y < H."""
    h, w = image_hw
    x, y = points_xy[..., 0], points_xy[..., 1]
    return (x >= 0) & (x < w) & (y >= 0) & (y < h)


@dataclass
class SamplingRecord:
    """
    The last decoder layer's cross-attention sampling for one image of the batch.

    locations: (Q, M, L, P, 2) (x, y) normalised to the padded input (as the model reads them: a
    level-l location x is feature column x * W_l, and the model treats each level's map as spanning
    the padded input); weights: (Q, M, L, P); reference: (Q, L, 2) or (Q, L, 4) reference points
    (boxes: cx, cy, w, h) as given to the attention; spatial_shapes: (L, 2) feature map sizes
    (H_l, W_l); level_strides: (L,) level strides in input pixels, or None if unknown; padded_hw:
    padded input size; input_hw: resized image size (unpadded).
    """

    locations: np.ndarray
    weights: np.ndarray
    reference: np.ndarray
    spatial_shapes: np.ndarray
    level_strides: object
    padded_hw: tuple
    input_hw: tuple

    def select(self, query_indices, image_hw):
        """Sampling of the detections coming from ``query_indices`` (D,), mapped to the original image."""
        q = np.asarray(query_indices, dtype=np.int64).reshape(-1)
        num_queries = self.locations.shape[0]
        if q.size and (q.min() < 0 or q.max() >= num_queries):
            raise ValueError(f"query_indices out of range [0, {num_queries}): {q.tolist()}")
        points = normalized_to_image_coords(self.locations[q], self.padded_hw, self.input_hw, image_hw)
        ref_xy = self.reference[q][:, 0, :2]  # level 0's copy (levels differ only by valid-ratio rounding)
        refs = normalized_to_image_coords(ref_xy, self.padded_hw, self.input_hw, image_hw)
        return DetectionSampling(
            points=points, weights=self.weights[q], reference_xy=refs, image_hw=tuple(image_hw)
        )


@dataclass
class DetectionSampling:
    """points: (D, M, L, P, 2) image pixels; weights: (D, M, L, P); reference_xy: (D, 2) image pixels."""

    points: np.ndarray
    weights: np.ndarray
    reference_xy: np.ndarray
    image_hw: tuple

    @property
    def num_levels(self):
        return self.points.shape[2]


def _level_strides(model, num_levels):
    """
    Strides of the attention's feature levels: the backbone's ``in_features`` strides, then doubling for
    each extra (stride-2 conv) level, as in DeformableDETR; None if the model does not expose them.
    """
    try:
        shapes = model.backbone.output_shape()
        strides = [int(shapes[f].stride) for f in model.in_features]
    except (AttributeError, KeyError, TypeError):
        return None
    if not strides or any(s <= 0 for s in strides):
        return None
    while len(strides) < num_levels:
        strides.append(strides[-1] * 2)
    return strides[:num_levels]


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "tensor") and isinstance(obj.tensor, torch.Tensor):  # ImageList
        return obj.tensor
    return None


class SamplingRecorder:
    """
    Record the last decoder layer's sampling points on every forward of ``model`` (a DeformableDETR).

    Use ``attach()`` once (or as a context manager), run the model, then ``latest(i)`` for image i.
    ``detach()`` removes the hooks; the model is otherwise untouched.
    """

    def __init__(self, model):
        self.model = model
        self.attn = find_last_cross_attn(model)
        self._handles = []
        self._clear()
        self._input_hws = None
        self.level_strides = _level_strides(model, self.attn.n_levels)

    def _clear(self):
        self._padded_hw = None
        self._reference = None
        self._spatial_shapes = None
        self._offsets = None
        self._logits = None

    # hooks ---------------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        batched_inputs = args[0] if args else kwargs.get("batched_inputs")
        self._input_hws = [tuple(int(s) for s in x["image"].shape[-2:]) for x in batched_inputs]
        self._clear()

    def _on_backbone(self, module, args, kwargs):
        t = _first_tensor(args[0]) if args else None
        if t is not None and t.dim() == 4 and self._padded_hw is None:  # first call: the whole batch
            self._padded_hw = tuple(int(s) for s in t.shape[-2:])

    def _on_attn(self, module, args, kwargs):
        ref = kwargs.get("reference_points", args[1] if len(args) > 1 else None)
        shapes = kwargs.get("input_spatial_shapes", args[3] if len(args) > 3 else None)
        self._reference = None if ref is None else ref.detach()
        self._spatial_shapes = None if shapes is None else shapes.detach().cpu()

    def _on_offsets(self, module, args, output):
        self._offsets = output.detach()

    def _on_weights(self, module, args, output):
        self._logits = output.detach()

    def attach(self):
        if self._handles:
            return self
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            self.attn.register_forward_pre_hook(self._on_attn, with_kwargs=True),
            self.attn.sampling_offsets.register_forward_hook(self._on_offsets),
            self.attn.attention_weights.register_forward_hook(self._on_weights),
        ]
        backbone = getattr(self.model, "backbone", None)
        if isinstance(backbone, torch.nn.Module):
            self._handles.append(backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # results -------------------------------------------------------------------------------------
    def latest(self, index=0):
        """SamplingRecord of image ``index`` of the last forward; RuntimeError if nothing was recorded."""
        captured = (self._offsets, self._logits, self._reference, self._spatial_shapes, self._input_hws)
        if any(v is None for v in captured):
            raise RuntimeError("no sampling recorded: run the model (in eval mode) after attach()")
        attn = self.attn
        n, len_q = self._reference.shape[:2]
        shape = (n, len_q, attn.n_heads, attn.n_levels, attn.n_points)
        offsets = self._offsets.view(*shape, 2)
        weights = self._logits.view(n, len_q, attn.n_heads, -1).softmax(-1).view(shape)
        locations = sampling_locations(self._reference, offsets, self._spatial_shapes, attn.n_points)
        input_hw = self._input_hws[index]
        padded_hw = self._padded_hw
        if padded_hw is None:  # backbone not called with the padded tensor: pad to the size divisibility
            div = int(getattr(self.model, "size_divisibility", 0) or 0)
            padded_hw = tuple(-(-s // div) * div if div > 0 else s for s in input_hw)
        return SamplingRecord(
            locations=locations[index].float().cpu().numpy(),
            weights=weights[index].float().cpu().numpy(),
            reference=self._reference[index].float().cpu().numpy(),
            spatial_shapes=self._spatial_shapes.numpy().astype(np.int64),
            level_strides=self.level_strides,
            padded_hw=padded_hw,
            input_hw=input_hw,
        )


def draw_sampling_points(image_bgr, sampling, heads=None, levels=None, draw_reference=True, alpha=0.75):
    """
    Draw sampling points on a copy of ``image_bgr`` (H, W, 3): colour = feature level, area proportional
    to the attention weight (a point with the uniform weight 1/(L*P) gets the base radius), a cross at
    each detection's reference point. Points outside the image are skipped.

    Args:
        sampling: DetectionSampling mapped to this image's size.
        heads, levels: optional iterables of head / level indices to draw (default all).
    Returns:
        (image, drawn): the new image and a (K, 2) float array of the drawn point centres (x, y).
    """
    image = np.ascontiguousarray(image_bgr).copy()
    h, w = image.shape[:2]
    if tuple(sampling.image_hw) != (h, w):
        raise ValueError(f"sampling was mapped to size {sampling.image_hw}, image is {(h, w)}")
    num_dets, num_heads, num_levels, num_points = sampling.weights.shape
    heads = range(num_heads) if heads is None else list(heads)
    levels = range(num_levels) if levels is None else list(levels)
    base = max(2.0, min(h, w) / 120.0)
    overlay = image.copy()
    drawn = []
    inside = points_inside(sampling.points, (h, w))
    for d in range(num_dets):
        for m in heads:
            for lvl in levels:
                color = LEVEL_COLORS_BGR[lvl % len(LEVEL_COLORS_BGR)]
                for p in range(num_points):
                    if not inside[d, m, lvl, p]:
                        continue
                    x, y = sampling.points[d, m, lvl, p]
                    rel = float(sampling.weights[d, m, lvl, p]) * num_levels * num_points
                    radius = int(round(min(base * 4, max(1.0, base * np.sqrt(max(rel, 0.0))))))
                    center = (int(np.floor(x)), int(np.floor(y)))
                    cv2.circle(overlay, center, radius, color, thickness=-1, lineType=cv2.LINE_AA)
                    drawn.append((x, y))
    image = cv2.addWeighted(overlay, alpha, image, 1.0 - alpha, 0.0)
    if draw_reference:
        size = int(round(base * 4))
        for x, y in sampling.reference_xy:
            if 0 <= x < w and 0 <= y < h:
                c = (int(np.floor(x)), int(np.floor(y)))
                cv2.drawMarker(image, c, (0, 0, 0), cv2.MARKER_CROSS, size + 2, 4, cv2.LINE_AA)
                cv2.drawMarker(image, c, (255, 255, 255), cv2.MARKER_CROSS, size, 2, cv2.LINE_AA)
    return image, np.asarray(drawn, dtype=np.float64).reshape(-1, 2)


def draw_level_legend(image_bgr, num_levels, strides=None):
    """Draw a small key 'level l (stride s)' in the level colours at the top-left corner, in place."""
    scale = max(0.35, min(image_bgr.shape[:2]) / 700.0)
    y = int(18 * scale / 0.5)
    for lvl in range(num_levels):
        text = f"level {lvl}" + (f" (/{strides[lvl]})" if strides else "")
        color = LEVEL_COLORS_BGR[lvl % len(LEVEL_COLORS_BGR)]
        cv2.putText(image_bgr, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image_bgr, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
        y += int(16 * scale / 0.5)
    return image_bgr


def make_panel_grid(panels, titles, num_cols=None, pad=4):
    """
    Tile equally sized BGR panels (H, W, 3) into one image, with a title strip above each panel.

    Returns an (rows * (H + title + pad) + pad, cols * (W + pad) + pad, 3) uint8 image.
    """
    if not panels:
        raise ValueError("no panels to tile")
    h, w = panels[0].shape[:2]
    if any(p.shape[:2] != (h, w) for p in panels):
        raise ValueError("all panels must have the same size")
    n = len(panels)
    cols = num_cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    font_scale = max(0.4, w / 600.0)
    title_h = int(28 * font_scale / 0.5) if font_scale > 0.5 else 24
    grid = np.full((rows * (h + title_h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + title_h + pad), pad + c * (w + pad)
        cv2.putText(
            grid,
            title,
            (x0 + 2, y0 + title_h - 7),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        grid[y0 + title_h : y0 + title_h + h, x0 : x0 + w] = panel
    return grid
