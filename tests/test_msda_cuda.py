"""CUDA kernel of multi-scale deformable attention vs the CPU kernel and a float64 reference.

Every test needs a visible CUDA device and ``ddetr_d2._C`` built with the CUDA kernel
(``FORCE_CUDA=1 pip install --no-build-isolation -e .``). Without a device the tests are skipped;
with a device but an extension lacking CUDA they are skipped too, or fail when
``DDETR_REQUIRE_EXTENSION=1`` (use that on GPU CI so a silent CPU-only build cannot pass).

Oracle: ``ms_deform_attn_pytorch`` (grid_sample) in float64 on the CPU, with autograd for the
gradients. Inputs are random (seeded per test); some sampling locations fall outside [0, 1].
"""

import os

import pytest
import torch

from ddetr_d2.ops import _extension
from ddetr_d2.ops.ms_deform_attn_function import ms_deform_attn
from ddetr_d2.ops.ms_deform_attn_pytorch import ms_deform_attn_pytorch

pytestmark = pytest.mark.cuda

LANES_ENV = "DDETR_MSDA_CUDA_LANES"  # forces the backward kernel's threads per (batch, query, head)


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)")
    required = os.environ.get("DDETR_REQUIRE_EXTENSION", "0") == "1"
    mod = _extension.get_extension()  # raises itself when required and missing
    if mod is None:
        pytest.skip(f"ddetr_d2._C cannot be imported: {_extension.extension_error()}")
    if not mod.has_cuda():
        msg = (
            "ddetr_d2._C was built without the CUDA kernel; rebuild with "
            "`FORCE_CUDA=1 pip install --no-build-isolation -e .`"
        )
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    return mod


def make_inputs(N, M, D, shapes, Q, P, seed, spread=0.1):
    """Random float64 CPU inputs; locations in [-spread, 1 + spread] (some read zero padding)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64) + 0.05
    attn = attn / attn.sum((-1, -2), keepdim=True)
    grad_out = torch.randn(N, Q, M * D, generator=g, dtype=torch.float64)
    return dict(
        value=value,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        loc=loc,
        attn=attn,
        grad_out=grad_out,
    )


def reference(inp, dtype=torch.float64):
    """float64 grid_sample reference on inputs rounded to `dtype`: (out, grad_v, grad_loc, grad_attn)."""
    value, loc, attn = (
        inp[k].to(dtype).to(torch.float64, copy=True).requires_grad_() for k in ("value", "loc", "attn")
    )
    out = ms_deform_attn_pytorch(value, inp["spatial_shapes"], inp["level_start_index"], loc, attn)
    out.backward(inp["grad_out"].to(dtype).double())
    return out.detach(), value.grad, loc.grad, attn.grad


def run_kernel(ext, inp, device, dtype, im2col_step=64):
    """Compiled forward + backward on `device`: (out, grad_v, grad_loc, grad_attn), returned on the CPU."""
    value, loc, attn, grad_out = (
        inp[k].to(device=device, dtype=dtype) for k in ("value", "loc", "attn", "grad_out")
    )
    shapes = inp["spatial_shapes"].to(device)
    start = inp["level_start_index"].to(device)
    out = ext.ms_deform_attn_forward(value, shapes, start, loc, attn, im2col_step)
    grads = ext.ms_deform_attn_backward(value, shapes, start, loc, attn, grad_out, im2col_step)
    results = [out, *grads]
    for r, like in zip(results, (grad_out, value, loc, attn)):
        assert r.dtype == dtype and r.device == like.device and r.shape == like.shape
    return [r.cpu() for r in results]


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.3g}"


NAMES = ("output", "grad_value", "grad_sampling_loc", "grad_attn_weight")
# Relative to max(1, max |expected|). The reference sees the inputs rounded to the tested dtype, so for
# half / bfloat16 the error is the rounding of the outputs (2^-11, 2^-8) plus float accumulation.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


def check_against_reference(ext, inp, dtype, im2col_step=64):
    got = run_kernel(ext, inp, "cuda", dtype, im2col_step)
    want = reference(inp, dtype)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, TOL[dtype], f"{name} ({dtype})")
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim", [1, 30, 32, 64, 71])
def test_matches_float64_reference(ext, dtype, head_dim):
    inp = make_inputs(N=2, M=3, D=head_dim, shapes=[(6, 5), (3, 4), (2, 1)], Q=7, P=3, seed=head_dim)
    check_against_reference(ext, inp, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_cpu_kernel(ext, dtype):
    inp = make_inputs(N=3, M=4, D=16, shapes=[(9, 7), (5, 4), (3, 2), (1, 1)], Q=11, P=4, seed=1)
    got = run_kernel(ext, inp, "cuda", dtype)
    cpu = run_kernel(ext, inp, "cpu", dtype)
    for name, a, b in zip(NAMES, got, cpu):
        assert_close(a, b, TOL[dtype], f"{name} CUDA vs CPU kernel ({dtype})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 32, 71])
def test_half_precision(ext, dtype, head_dim):
    """Half / bfloat16 in, same dtype out; float accumulation keeps the error at output rounding level."""
    # Locations inside [0, 1]: rounded to 16 bits, a location outside can land exactly on the support edge
    # h_im = -1 (e.g. loc = -1/16 for H = 8), where the kernel (strict -1 < h_im) and grid_sample differ in
    # the location gradient. Zero padding is still exercised (h_im in [-0.5, 0) reads padded corners).
    inp = make_inputs(
        N=2, M=2, D=head_dim, shapes=[(8, 6), (4, 3)], Q=9, P=4, seed=100 + head_dim, spread=0.0
    )
    check_against_reference(ext, inp, dtype)


@pytest.mark.parametrize("N,step", [(5, 2), (5, 3), (7, 64), (3, 1), (4, 4)])
def test_im2col_step_need_not_divide_batch(ext, N, step):
    inp = make_inputs(N=N, M=2, D=8, shapes=[(5, 5), (3, 2)], Q=6, P=2, seed=N * 10 + step)
    got = check_against_reference(ext, inp, torch.float64, im2col_step=step)
    whole = run_kernel(ext, inp, "cuda", torch.float64, im2col_step=N)
    for name, a, b in zip(NAMES, got, whole):
        assert_close(a, b, 1e-12, f"{name}: im2col_step={step} vs one chunk")


@pytest.mark.parametrize("lanes", ["1", "4", "32", "64", "128", "256"])
@pytest.mark.parametrize("head_dim", [1, 30, 71, 256])
def test_every_backward_reduction_path(ext, monkeypatch, lanes, head_dim):
    """Threads per group below / equal to / above head_dim, within one warp and across warps (smem)."""
    monkeypatch.setenv(LANES_ENV, lanes)
    inp = make_inputs(N=2, M=2, D=head_dim, shapes=[(4, 5), (2, 3)], Q=5, P=2, seed=int(lanes) + head_dim)
    check_against_reference(ext, inp, torch.float32)


def test_large_head_dim_default_lanes(ext):
    """head_dim > kMaxBackwardLanes: every lane loops over several channels."""
    inp = make_inputs(N=1, M=1, D=1025, shapes=[(3, 4), (2, 2)], Q=3, P=2, seed=7)
    check_against_reference(ext, inp, torch.float64)


def test_many_groups_default_lanes(ext):
    """Enough (batch, query, head) groups that the default heuristic keeps <= 32 lanes for head_dim 64."""
    inp = make_inputs(N=2, M=8, D=64, shapes=[(16, 16), (8, 8), (4, 4), (2, 2)], Q=2500, P=4, seed=8)
    check_against_reference(ext, inp, torch.float32)


def test_invalid_lanes_env_raises(ext, monkeypatch):
    monkeypatch.setenv(LANES_ENV, "48")
    inp = make_inputs(N=1, M=1, D=4, shapes=[(2, 2)], Q=1, P=1, seed=0)
    with pytest.raises(RuntimeError, match=LANES_ENV):
        run_kernel(ext, inp, "cuda", torch.float32)


def test_contended_atomics(ext):
    """Every query samples the same point: grad_value is a sum of many atomic adds into 4 pixels per head."""
    inp = make_inputs(N=2, M=2, D=32, shapes=[(7, 9), (3, 3)], Q=600, P=2, seed=3)
    inp["loc"] = torch.full_like(inp["loc"], 0.37)
    inp["loc"][..., 1] = 0.61
    check_against_reference(ext, inp, torch.float64)
    check_against_reference(ext, inp, torch.float32)


def test_out_of_range_and_border_locations(ext):
    inp = make_inputs(N=1, M=2, D=5, shapes=[(4, 6), (2, 3)], Q=40, P=2, seed=4, spread=0.6)
    far = inp["loc"].clone()
    far[:, :10] = -3.0  # entirely outside: output and every gradient are zero there
    far[:, 10:20, ..., 0] = 1.0 + 0.25 / 6  # in the last half pixel of the support: right corners are padding
    inp["loc"] = far
    got = check_against_reference(ext, inp, torch.float64)
    assert got[0][:, :10].abs().max() == 0
    assert got[2][:, :10].abs().max() == 0 and got[3][:, :10].abs().max() == 0


def test_noncontiguous_inputs(ext):
    inp = make_inputs(N=2, M=3, D=6, shapes=[(5, 4), (2, 2)], Q=4, P=2, seed=5)
    want = run_kernel(ext, inp, "cuda", torch.float32)
    dev = {k: v.cuda() for k, v in inp.items()}
    value = dev["value"].float().transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    loc = dev["loc"].float().permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn = dev["attn"].float().repeat_interleave(2, dim=-1)[..., ::2]
    grad_out = dev["grad_out"].float().transpose(0, 1).contiguous().transpose(0, 1)
    assert not (
        value.is_contiguous() or loc.is_contiguous() or attn.is_contiguous() or grad_out.is_contiguous()
    )
    args = (value, dev["spatial_shapes"], dev["level_start_index"], loc, attn)
    out = ext.ms_deform_attn_forward(*args, 64)
    grads = ext.ms_deform_attn_backward(*args, grad_out, 64)
    for name, a, b in zip(NAMES, [out, *grads], want):
        assert_close(a.cpu(), b, 1e-6, f"{name} (non-contiguous inputs)")


def test_forward_is_deterministic(ext):
    inp = make_inputs(N=2, M=2, D=32, shapes=[(6, 6), (3, 3)], Q=50, P=4, seed=6)
    a = run_kernel(ext, inp, "cuda", torch.float32)[0]
    b = run_kernel(ext, inp, "cuda", torch.float32)[0]
    assert torch.equal(a, b)


def test_empty_queries(ext):
    inp = make_inputs(N=2, M=2, D=4, shapes=[(3, 3)], Q=0, P=2, seed=0)
    out, gv, gl, ga = run_kernel(ext, inp, "cuda", torch.float32)
    assert out.shape == (2, 0, 8) and gl.shape == (2, 0, 2, 1, 2, 2) and ga.shape == (2, 0, 2, 1, 2)
    assert gv.shape == inp["value"].shape and gv.abs().max() == 0


def test_side_stream(ext):
    """The kernels run on the current stream: results are right when it is not the default stream."""
    inp = make_inputs(N=2, M=2, D=16, shapes=[(8, 8), (4, 4)], Q=30, P=2, seed=9)
    want = run_kernel(ext, inp, "cuda", torch.float32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run_kernel(ext, inp, "cuda", torch.float32)
    stream.synchronize()
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, 1e-6, f"{name} on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(ext):
    """Inputs on cuda:1 while cuda:0 is current: the kernel must run on the inputs' device."""
    inp = make_inputs(N=2, M=2, D=8, shapes=[(5, 5)], Q=6, P=2, seed=10)
    with torch.cuda.device(0):
        got = run_kernel(ext, inp, "cuda:1", torch.float64)
    want = reference(inp)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, TOL[torch.float64], f"{name} on cuda:1")


def test_bad_inputs_raise(ext):
    inp = make_inputs(N=1, M=2, D=4, shapes=[(3, 3)], Q=2, P=2, seed=0)
    value = inp["value"].float().cuda()
    shapes, start = inp["spatial_shapes"].cuda(), inp["level_start_index"].cuda()
    loc, attn = inp["loc"].float().cuda(), inp["attn"].float().cuda()
    with pytest.raises(RuntimeError, match="same device"):
        ext.ms_deform_attn_forward(value, shapes, start, loc.cpu(), attn, 64)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.ms_deform_attn_forward(value, shapes, start, loc.double(), attn, 64)
    with pytest.raises(RuntimeError, match="S="):
        ext.ms_deform_attn_forward(value[:, :-1], shapes, start, loc, attn, 64)
    with pytest.raises(RuntimeError, match="grad_output"):
        ext.ms_deform_attn_backward(value, shapes, start, loc, attn, torch.zeros(1, 2, 7, device="cuda"), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_on_cuda(ext, dtype):
    """The public op (autograd Function) on CUDA tensors agrees with the float64 reference."""
    inp = make_inputs(N=2, M=2, D=16, shapes=[(6, 4), (3, 2)], Q=8, P=3, seed=11, spread=0.0)
    value, loc, attn = (inp[k].to("cuda", dtype).requires_grad_() for k in ("value", "loc", "attn"))
    out = ms_deform_attn(value, inp["spatial_shapes"].cuda(), inp["level_start_index"].cuda(), loc, attn, 64)
    out.backward(inp["grad_out"].to("cuda", dtype))
    want = reference(inp, dtype)
    for name, a, b in zip(NAMES, [out, value.grad, loc.grad, attn.grad], want):
        assert a.dtype == dtype and a.is_cuda
        assert_close(a.detach().cpu(), b, TOL[dtype], f"{name} via ms_deform_attn ({dtype})")


def test_gradcheck_double(ext):
    inp = make_inputs(N=1, M=2, D=3, shapes=[(3, 2), (2, 1)], Q=2, P=2, seed=12, spread=0.0)
    shapes, start = inp["spatial_shapes"].cuda(), inp["level_start_index"].cuda()
    value, loc, attn = (inp[k].cuda().requires_grad_() for k in ("value", "loc", "attn"))

    def fn(v, sl, aw):
        return ms_deform_attn(v, shapes, start, sl, aw, 2)

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-5, rtol=1e-3)
