"""Gather-based export formulation of deformable attention vs the C++ kernel and a float64
``grid_sample`` reference, on fresh random inputs with points inside, on the borders, on pixel
centres / edges, outside the map and NaN; and the formulation switch used while tracing / exporting."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from ddetr_d2.ops import MSDeformAttn, _extension, ms_deform_attn_gather, msda_export_formulation

_C = _extension.get_extension()


def level_index(shapes):
    areas = shapes[:, 0] * shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def grid_sample_float64(value, shapes, loc, attn):
    """Independent reference: one ``grid_sample`` per (batch, head, level) in float64."""
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(N, Q, M, D, dtype=torch.float64)
    starts = level_index(shapes).tolist()
    for n in range(N):
        for m in range(M):
            for lid, (H, W) in enumerate(shapes.tolist()):
                v = value[n, starts[lid] : starts[lid] + H * W, m].double().t().reshape(1, D, H, W)
                grid = 2 * loc[n, :, m, lid].double() - 1  # (Q, P, 2)
                s = F.grid_sample(v, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
                out[n, :, m] += (s[0] * attn[n, :, m, lid].double()[None]).sum(-1).t()
    return out.reshape(N, Q, M * D)


def make_case(g, N, Q, M, D, hw, P, dtype):
    shapes = torch.tensor(hw, dtype=torch.long)
    L = len(hw)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    size = shapes.flip(-1).double()[:, None, :]  # (L, 1, 2) = (W, H)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    pick = torch.rand(N, Q, M, L, P, 2, generator=g)
    loc = torch.where(pick < 0.1, torch.zeros_like(loc), loc)  # on the border 0
    loc = torch.where((pick >= 0.1) & (pick < 0.2), torch.ones_like(loc), loc)  # on the border 1
    # exactly on a pixel centre / between two pixels (integer / half-integer pixel coordinates)
    k = torch.floor(torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (size + 2)) - 1
    loc = torch.where((pick >= 0.2) & (pick < 0.3), (k + 0.5) / size, loc)
    loc = torch.where((pick >= 0.3) & (pick < 0.4), k / size, loc)
    loc = torch.where((pick >= 0.4) & (pick < 0.45), loc * 50 - 20, loc)  # far outside
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, level_index(shapes), loc.to(dtype), attn.to(dtype)


SHAPES = [
    (1, 1, 1, 1, [(1, 1)], 1),
    (2, 37, 3, 5, [(7, 13)], 2),
    (2, 60, 8, 16, [(7, 13), (4, 7), (2, 4), (1, 1)], 4),
    (1, 9, 2, 8, [(9, 1), (1, 9)], 3),
]


@pytest.mark.parametrize("N,Q,M,D,hw,P", SHAPES)
def test_gather_matches_float64_grid_sample(N, Q, M, D, hw, P):
    g = torch.Generator().manual_seed(100 + N * Q + M * D)
    value, shapes, start, loc, attn = make_case(g, N, Q, M, D, hw, P, torch.float64)
    got = ms_deform_attn_gather(value, shapes, start, loc, attn)
    want = grid_sample_float64(value, shapes, loc, attn)
    assert got.shape == (N, Q, M * D) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.skipif(_C is None, reason=f"ddetr_d2._C not built: {_extension.extension_error()}")
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("N,Q,M,D,hw,P", SHAPES[1:])
def test_gather_matches_kernel(N, Q, M, D, hw, P, dtype, atol):
    g = torch.Generator().manual_seed(200 + N * Q + P)
    inputs = make_case(g, N, Q, M, D, hw, P, dtype)
    got = ms_deform_attn_gather(*inputs)
    want = _C.ms_deform_attn_forward(*inputs, 64)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_nan_and_inf_locations_read_zero():
    g = torch.Generator().manual_seed(3)
    value, shapes, start, loc, attn = make_case(g, 1, 4, 2, 3, [(3, 5), (2, 2)], 2, torch.float64)
    for bad in (math.nan, math.inf, -math.inf, 1e30):
        out = ms_deform_attn_gather(value, shapes, start, torch.full_like(loc, bad), attn)
        assert torch.equal(out, torch.zeros_like(out)), bad


def test_formulation_switch_is_scoped_and_checked():
    from ddetr_d2.ops.ms_deform_attn_export import get_export_formulation

    assert get_export_formulation() == "grid_sample"
    with msda_export_formulation("gather"):
        assert get_export_formulation() == "gather"
    assert get_export_formulation() == "grid_sample"
    with pytest.raises(ValueError, match="grid_sample"):
        with msda_export_formulation("bilinear"):
            pass


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_module_uses_the_chosen_formulation():
    """Traced with "gather", the graph has no grid_sampler; with the default, it has one; both agree."""
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 9], [3, 5]])
    start = level_index(shapes)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.2 * torch.randn_like(p))
    query, src = torch.randn(1, 7, 32), torch.randn(1, 69, 32)
    ref = torch.rand(1, 7, 2, 2) * 1.4 - 0.2

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, r, x):
            return self.attn(q, r, x, shapes, start)

    fn = Wrapped().eval()

    with torch.no_grad():
        eager = fn(query, ref, src)
        grid_trace = torch.jit.trace(fn, (query, ref, src))
        with msda_export_formulation("gather"):
            gather_trace = torch.jit.trace(fn, (query, ref, src))
    assert "grid_sampler" in str(grid_trace.inlined_graph)
    assert "grid_sampler" not in str(gather_trace.inlined_graph) and "index_select" in str(
        gather_trace.inlined_graph
    )
    query2, ref2 = torch.randn(1, 7, 32), torch.rand(1, 7, 2, 2) * 1.4 - 0.2
    with torch.no_grad():
        torch.testing.assert_close(gather_trace(query2, ref2, src), fn(query2, ref2, src), rtol=0, atol=2e-5)
        torch.testing.assert_close(grid_trace(query, ref, src), eager, rtol=0, atol=2e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_gather_onnx_graph_has_no_grid_sample_and_matches():
    onnx = pytest.importorskip("onnx", reason="onnx is a test extra (requirements-test.txt)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (requirements-test.txt)")
    import numpy as np

    g = torch.Generator().manual_seed(21)
    value, shapes, start, loc, attn = make_case(g, 2, 11, 4, 8, [(7, 13), (4, 7), (2, 4)], 3, torch.float32)

    class Op(torch.nn.Module):
        def forward(self, v, lo, a):
            from ddetr_d2.ops import ms_deform_attn

            return ms_deform_attn(v, shapes, start, lo, a)

    buf = io.BytesIO()
    with msda_export_formulation("gather"):
        torch.onnx.export(Op(), (value, loc, attn), buf, opset_version=13, input_names=["v", "loc", "attn"])
    model = onnx.load_from_string(buf.getvalue())
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" not in ops and "Gather" in ops, ops
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    value2, _, _, loc2, attn2 = make_case(g, 2, 11, 4, 8, [(7, 13), (4, 7), (2, 4)], 3, torch.float32)
    (got,) = session.run(None, {"v": value2.numpy(), "loc": loc2.numpy(), "attn": attn2.numpy()})
    want = grid_sample_float64(value2, shapes, loc2, attn2).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)
