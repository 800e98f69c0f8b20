"""Export formulations of multi-scale deformable attention.

While tracing / exporting, ``ms_deform_attn`` cannot call the compiled kernels; it runs one of two
pure-PyTorch formulations, chosen with :func:`msda_export_formulation`:

* ``"grid_sample"`` (default): ``ms_deform_attn_pytorch``; exports to ONNX ``GridSample`` (opset >= 16).
* ``"gather"``: :func:`ms_deform_attn_gather`; bilinear sampling written out as index arithmetic,
  ``Gather`` and element-wise ops only (no ``GridSample``), for runtimes that lack or miscompile
  ``GridSample`` (TensorRT, older onnxruntime builds, opset < 16).

Both sample exactly like the kernels: pixel centres at half-integers (``align_corners=False``), and
each of the four bilinear corners outside the map reads zero (zero padding), so a point contributes
as long as one corner is inside; NaN locations read zero.
"""

import contextlib

import torch

__all__ = ["ms_deform_attn_gather", "msda_export_formulation", "get_export_formulation", "FORMULATIONS"]

FORMULATIONS = ("grid_sample", "gather")
_formulation = "grid_sample"


def get_export_formulation():
    """The formulation ``ms_deform_attn`` uses while tracing / exporting ("grid_sample" or "gather")."""
    return _formulation


@contextlib.contextmanager
def msda_export_formulation(name):
    """Context manager: trace / export deformable attention with formulation ``name`` (see module doc)."""
    global _formulation
    if name not in FORMULATIONS:
        raise ValueError(f"MSDA export formulation must be one of {FORMULATIONS}, got {name!r}")
    previous, _formulation = _formulation, name
    try:
        yield
    finally:
        _formulation = previous


def ms_deform_attn_gather(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """
    Same contract as ``ms_deform_attn`` (forward only), written with ``index_select`` (ONNX ``Gather``),
    ``floor``, comparisons, ``where`` and arithmetic.

    Args:
        value: (N, S, n_heads, head_dim), S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 (H_l, W_l); read on the host (constants of a traced graph).
        level_start_index: (L,) int64 (unused: the starts follow from spatial_shapes).
        sampling_locations: (N, Len_q, n_heads, L, P, 2) normalised (x, y).
        attention_weights: (N, Len_q, n_heads, L, P).
        im2col_step: unused.
    Returns:
        (N, Len_q, n_heads * head_dim)
    """
    del level_start_index, im2col_step
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights)
    )
    rows = value.reshape(N * S * M, D)  # row (n * S + s) * M + m
    device = value.device
    # (N, 1, M, 1, 1) offset of (n, m) in `rows`, without the position term
    batch_head = torch.arange(N, device=device).view(N, 1, 1, 1, 1) * (S * M) + torch.arange(
        M, device=device
    ).view(1, 1, M, 1, 1)
    # the four bilinear corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1) on a last axis
    corner_dx = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype, device=device)
    corner_dy = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dtype, device=device)
    output = None
    start = 0
    for lid, (H, W) in enumerate(spatial_shapes.tolist()):
        H, W = int(H), int(W)
        # pixel coordinates, centres at integers: x = loc_x * W - 0.5 (align_corners=False)
        x = sampling_locations[:, :, :, lid, :, 0:1] * W - 0.5  # (N, Q, M, P, 1)
        y = sampling_locations[:, :, :, lid, :, 1:2] * H - 0.5
        x0 = torch.floor(x)
        y0 = torch.floor(y)
        xi = x0 + corner_dx  # (N, Q, M, P, 4)
        yi = y0 + corner_dy
        # bilinear weight of each corner: (1 - |x - xi|) * (1 - |y - yi|)
        corner = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
        inside = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)  # False for NaN
        weight = attention_weights[:, :, :, lid, :, None] * corner
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        pos = torch.where(inside, yi * W + xi, torch.zeros_like(xi)).long()
        index = batch_head + (start + pos) * M  # (N, Q, M, P, 4)
        sampled = torch.index_select(rows, 0, index.reshape(-1)).view(N * Q * M, P * 4, D)
        # (N*Q*M, 1, P*4) @ (N*Q*M, P*4, D): weighted sum over points and corners
        level_out = torch.matmul(weight.reshape(N * Q * M, 1, P * 4), sampled)
        output = level_out if output is None else output + level_out
        start += H * W
    return output.reshape(N, Q, M * D)
