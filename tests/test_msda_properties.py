"""Property test: the CPU kernel equals the float64 reference on hypothesis-drawn shapes and inputs."""

import pytest
import torch

from ddetr_d2.ops import _extension, ms_deform_attn, ms_deform_attn_pytorch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(
    _extension.get_extension() is None, reason=f"ddetr_d2._C not built: {_extension.extension_error()}"
)

level = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 3),
    Q=st.integers(1, 40),
    M=st.integers(1, 4),
    D=st.one_of(st.integers(1, 20), st.just(32)),
    hw=st.lists(level, min_size=1, max_size=4),
    P=st.integers(1, 5),
    spread=st.sampled_from([0.0, 0.3, 2.0]),
    step=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_reference(N, Q, M, D, hw, P, spread, step, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L = len(hw)
    value = torch.randn(N, int(areas.sum()), M, D, generator=g, dtype=torch.float64)
    # spread 0: inside [0, 1]; larger spreads put samples on the border band and far outside
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.randn(N, Q, M, L, P, generator=g, dtype=torch.float64)
    grad_out = torch.randn(N, Q, M * D, generator=g, dtype=torch.float64)

    outs, grads = [], []
    for fn, kwargs in ((ms_deform_attn, {"im2col_step": step}), (ms_deform_attn_pytorch, {})):
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, start, leaves[1], leaves[2], **kwargs)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")
