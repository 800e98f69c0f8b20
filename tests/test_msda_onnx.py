"""ONNX export of MSDeformAttn: the exporter takes the grid_sample reference (opset 16), and the
exported graph run by onnxruntime matches the PyTorch module (C++ kernel) on fresh random inputs."""

import io

import numpy as np
import pytest
import torch

from ddetr_d2.ops import MSDeformAttn

onnx = pytest.importorskip("onnx", reason="onnx is a test extra (requirements-test.txt)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (requirements-test.txt)")


class _Wrapped(torch.nn.Module):
    """Spatial shapes are constants of the exported graph (they are fixed per input resolution)."""

    def __init__(self, attn, spatial_shapes, level_start_index):
        super().__init__()
        self.attn = attn
        self.register_buffer("spatial_shapes", spatial_shapes)
        self.register_buffer("level_start_index", level_start_index)

    def forward(self, query, reference_points, input_flatten):
        return self.attn(query, reference_points, input_flatten, self.spatial_shapes, self.level_start_index)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_exports_to_onnx_and_matches(ref_dim):
    torch.manual_seed(ref_dim)
    shapes = torch.tensor([[7, 13], [4, 7], [2, 4]])
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3).eval()
    with torch.no_grad():  # move away from the symmetric init so every sample matters
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = _Wrapped(attn, shapes, start).eval()
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    query, x = torch.randn(2, 11, 32), torch.randn(2, S, 32)
    ref = torch.rand(2, 11, 3, ref_dim) * 1.2 - 0.1  # some references outside [0, 1]

    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (query, ref, x),
        buf,
        opset_version=16,
        input_names=["query", "reference_points", "input_flatten"],
        output_names=["output"],
        dynamic_axes={
            "query": {0: "n", 1: "q"},
            "reference_points": {0: "n", 1: "q"},
            "input_flatten": {0: "n"},
        },
    )
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])

    # fresh inputs of another batch / query count than the traced ones (dynamic axes)
    query2, x2 = torch.randn(3, 5, 32), torch.randn(3, S, 32)
    ref2 = torch.rand(3, 5, 3, ref_dim)
    (got,) = session.run(
        None, {"query": query2.numpy(), "reference_points": ref2.numpy(), "input_flatten": x2.numpy()}
    )
    with torch.no_grad():
        want = model(query2, ref2, x2).numpy()
    assert got.shape == want.shape == (3, 5, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
