"""C++ CPU kernel of multi-scale deformable attention vs the float64 pure-PyTorch reference."""

import math
import os

import pytest
import torch

from ddetr_d2.ops import _extension, ms_deform_attn, ms_deform_attn_pytorch
from ddetr_d2.ops.ms_deform_attn_function import MSDeformAttnFunction

_C = _extension.get_extension()
needs_ext = pytest.mark.skipif(_C is None, reason=f"ddetr_d2._C not built: {_extension.extension_error()}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def testing_ext(request, tmp_path_factory):
    """The test-only extension csrc/testing/ms_deform_attn_testing.cpp (naive kernels on the CUDA kernel's
    bilinear header, thread probe), built once with the flags setup.py gives ddetr_d2._C and cached under
    the pytest cache (rebuilt only when its sources change)."""
    from torch.utils import cpp_extension

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if cache is not None:
        build_dir = str(cache.mkdir("ddetr_msda_testing_ext"))
    else:
        build_dir = str(tmp_path_factory.mktemp("ddetr_msda_testing_ext"))
    csrc = os.path.join(REPO, "csrc")
    try:
        return cpp_extension.load(
            name="ddetr_msda_testing",
            sources=[os.path.join(csrc, "testing", "ms_deform_attn_testing.cpp"),
                     os.path.join(csrc, "ms_deform_attn_checks.cpp")],
            extra_include_paths=[csrc],
            extra_cflags=["-O2", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
        )
    except (RuntimeError, OSError) as e:  # no compiler / ninja on this machine
        pytest.skip(f"cannot build the test-only extension: {e}")


def level_index(shapes):
    areas = shapes[:, 0] * shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def make_case(g, N, Q, M, D, hw, P, dtype=torch.float64, where="mixed"):
    """Random inputs. `where`: "mixed" = inside, on the [0, 1] border and outside; "smooth" = away from
    pixel boundaries and from the edges of the sampling support (for finite differences)."""
    shapes = torch.tensor(hw, dtype=torch.long)
    L = len(hw)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    size = shapes.flip(-1).to(torch.float64)[:, None, :]  # (L, 1, 2) = (W, H), matching (x, y)
    if where == "smooth":
        # pixel coordinate k + f, k in [-1, size-1], f in [0.15, 0.85]; a few far outside (zero grad)
        k = torch.floor(torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (size + 1)) - 1
        f = 0.15 + 0.7 * torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64)
        loc = (k + f + 0.5) / size
        far = torch.rand(N, Q, M, L, P, 1, generator=g) < 0.1
        loc = torch.where(far, loc + 3.0, loc)
    else:
        loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
        pick = torch.rand(N, Q, M, L, P, 2, generator=g)
        loc = torch.where(pick < 0.08, torch.zeros_like(loc), loc)  # on the border x or y = 0
        loc = torch.where((pick >= 0.08) & (pick < 0.16), torch.ones_like(loc), loc)  # on the border = 1
        loc = torch.where((pick >= 0.16) & (pick < 0.2), loc * 5 - 2, loc)  # far outside
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, level_index(shapes), loc.to(dtype), attn.to(dtype)


def reference_with_grads(value, shapes, start, loc, attn, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(leaves[0], shapes, start, leaves[1], leaves[2])
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def kernel_with_grads(value, shapes, start, loc, attn, grad_out, im2col_step=64):
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2], im2col_step)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, rel, name):
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= rel * scale, f"{name}: max abs error {err:.3g} > {rel:.1g} * {scale:.3g}"


# (N, Q, M, D, spatial shapes, P): 1-4 levels, odd sizes incl. 1x1 and 7x13, heads 1-8, points 1-8,
# head_dim 1-64, Len_q 1-500, batch 1-3.
SHAPES = [
    (1, 1, 1, 1, [(1, 1)], 1),
    (2, 37, 3, 5, [(7, 13)], 2),
    (3, 500, 8, 32, [(7, 13), (4, 7), (2, 4), (1, 1)], 4),
    (1, 120, 2, 64, [(16, 9), (1, 1)], 8),
    (2, 64, 4, 17, [(5, 5), (3, 2), (1, 1)], 3),
    (1, 7, 8, 2, [(1, 1), (1, 1), (7, 13), (2, 31)], 5),
    (3, 33, 5, 8, [(9, 1), (1, 9)], 1),
    # channel counts that hit different code paths of the kernels (odd, > 64, > 1024)
    (1, 9, 2, 71, [(4, 3), (2, 2)], 2),
    (1, 4, 1, 1025, [(3, 4)], 2),
]


@needs_ext
@pytest.mark.parametrize("N,Q,M,D,hw,P", SHAPES)
def test_float64_matches_reference(N, Q, M, D, hw, P):
    g = torch.Generator().manual_seed(1000 + N * Q + M * D)
    inputs = make_case(g, N, Q, M, D, hw, P)
    grad_out = torch.randn(N, Q, M * D, generator=g, dtype=torch.float64)
    out, grads = kernel_with_grads(*inputs, grad_out)
    ref_out, ref_grads = reference_with_grads(*inputs, grad_out)
    assert out.shape == (N, Q, M * D) and out.dtype == torch.float64
    assert_close(out, ref_out, 1e-12, "output")
    # location gradients are not defined exactly on pixel boundaries (x or y = 0 or 1 put the sample
    # on a half-integer pixel coordinate, which is not a boundary, so every sample here is comparable).
    for name, gk, gr in zip(("grad_value", "grad_loc", "grad_attn"), grads, ref_grads):
        assert_close(gk, gr, 1e-11, name)


@needs_ext
@pytest.mark.parametrize("N,Q,M,D,hw,P", SHAPES[1:5])
def test_float32_matches_float64_reference(N, Q, M, D, hw, P):
    g = torch.Generator().manual_seed(7 + N * Q + D)
    inputs = make_case(g, N, Q, M, D, hw, P, dtype=torch.float32)
    grad_out = torch.randn(N, Q, M * D, generator=g)
    out, grads = kernel_with_grads(*inputs, grad_out)
    ref_out, ref_grads = reference_with_grads(*inputs, grad_out)
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in grads)
    assert_close(out, ref_out, 2e-5, "output")
    for name, gk, gr in zip(("grad_value", "grad_loc", "grad_attn"), grads, ref_grads):
        assert_close(gk, gr, 1e-4, name)


def test_naive_header_path_matches_reference(testing_ext):
    """The per-channel ddetr::bilinear_sample(_backward) functions the CUDA kernel is built on."""
    g = torch.Generator().manual_seed(3)
    inputs = make_case(g, 2, 23, 3, 5, [(7, 13), (2, 3), (1, 1)], 3)
    grad_out = torch.randn(2, 23, 15, generator=g, dtype=torch.float64)
    ref_out, ref_grads = reference_with_grads(*inputs, grad_out)
    assert_close(testing_ext.ms_deform_attn_forward_naive(*inputs), ref_out, 1e-12, "naive output")
    for name, gk, gr in zip(
        ("value", "loc", "attn"), testing_ext.ms_deform_attn_backward_naive(*inputs, grad_out), ref_grads
    ):
        assert_close(gk, gr, 1e-11, f"naive grad_{name}")
    # half / bfloat16 storage with float accumulation, as on the GPU
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        v, s, st, loc, a = inputs
        low = (v.to(dtype), s, st, loc.to(dtype), a.to(dtype))
        exact = ms_deform_attn_pytorch(*(t.double() if t.is_floating_point() else t for t in low))
        out = testing_ext.ms_deform_attn_forward_naive(*low)
        assert out.dtype == dtype
        assert_close(out, exact, tol, f"naive {dtype} output")


@needs_ext
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(11)
    for N, Q, M, D, hw, P in [(1, 3, 2, 4, [(3, 2), (2, 1)], 2), (2, 2, 1, 3, [(1, 1), (4, 5)], 3)]:
        value, shapes, start, loc, attn = make_case(g, N, Q, M, D, hw, P, where="smooth")
        args = [value.requires_grad_(), shapes, start, loc.requires_grad_(), attn.requires_grad_(), 1]
        assert torch.autograd.gradcheck(MSDeformAttnFunction.apply, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("step", [1, 2, 3, 64])
def test_im2col_step_need_not_divide_batch(step):
    g = torch.Generator().manual_seed(5)
    inputs = make_case(g, 5, 6, 2, 3, [(3, 4), (1, 2)], 2)
    grad_out = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    out, grads = kernel_with_grads(*inputs, grad_out, im2col_step=step)
    ref_out, ref_grads = reference_with_grads(*inputs, grad_out)
    assert_close(out, ref_out, 1e-12, "output")
    for gk, gr in zip(grads, ref_grads):
        assert_close(gk, gr, 1e-11, "grad")


@needs_ext
def test_batch_154_with_step_64():
    g = torch.Generator().manual_seed(6)
    inputs = make_case(g, 154, 3, 2, 2, [(2, 3), (1, 1)], 2, dtype=torch.float32)
    grad_out = torch.randn(154, 3, 4, generator=g)
    out, grads = kernel_with_grads(*inputs, grad_out, im2col_step=64)
    ref_out, ref_grads = reference_with_grads(*inputs, grad_out)
    assert_close(out, ref_out, 2e-5, "output")
    for gk, gr in zip(grads, ref_grads):
        assert_close(gk, gr, 1e-4, "grad")


@needs_ext
def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(8)
    value, shapes, start, loc, attn = make_case(g, 2, 9, 3, 4, [(5, 6), (2, 2)], 2)
    # same data behind transposed / strided views
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = torch.stack([loc[..., 0], loc[..., 1]], 0).permute(1, 2, 3, 4, 5, 0)
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], 0).t()
    for t in (value_nc, loc_nc, attn_nc, shapes_nc):
        assert not t.is_contiguous()
    grad_out = torch.randn(2, 9, 12, generator=g, dtype=torch.float64)
    out, grads = kernel_with_grads(
        value_nc, shapes_nc, start, loc_nc, attn_nc, grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    )
    ref_out, ref_grads = reference_with_grads(value, shapes, start, loc, attn, grad_out)
    assert_close(out, ref_out, 1e-12, "output")
    for gk, gr in zip(grads, ref_grads):
        assert_close(gk, gr, 1e-11, "grad")


@needs_ext
def test_backward_deterministic_and_thread_independent():
    g = torch.Generator().manual_seed(9)
    inputs = make_case(g, 2, 200, 4, 16, [(11, 13), (6, 7), (1, 1)], 4, dtype=torch.float32)
    grad_out = torch.randn(2, 200, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            results.append(
                _C.ms_deform_attn_backward(*inputs, grad_out, 64) + [_C.ms_deform_attn_forward(*inputs, 64)]
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_runs_on_several_threads(testing_ext):
    """The compile flags of ddetr_d2._C (-fopenmp, as in setup.py) make at::parallel_for use every thread."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch.get_num_threads() < 2")
    assert testing_ext.parallel_threads_used(8) == min(threads, 8)


@needs_ext
def test_shipped_extension_has_openmp_parallel_regions_and_no_test_hooks():
    """ddetr_d2._C calls into the OpenMP runtime (its at::parallel_for loops were compiled with -fopenmp)
    and carries none of the test-only functions."""
    with open(_C.__file__, "rb") as f:
        binary = f.read()
    assert b"GOMP_parallel" in binary
    assert not [name for name in dir(_C) if "naive" in name or "threads_used" in name]


@needs_ext
def test_half_on_cpu_computed_in_float32():
    g = torch.Generator().manual_seed(10)
    inputs = make_case(g, 1, 20, 2, 8, [(4, 5), (2, 2)], 2)
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    out = ms_deform_attn(*half)
    assert out.dtype == torch.float16
    exact = ms_deform_attn_pytorch(*(t.float() if t.is_floating_point() else t for t in half))
    assert_close(out, exact.double(), 2e-3, "half output")
    leaves = [half[0].requires_grad_(), half[3].requires_grad_(), half[4].requires_grad_()]
    ms_deform_attn(leaves[0], half[1], half[2], leaves[1], leaves[2]).sum().backward()
    assert all(t.grad.dtype == torch.float16 and torch.isfinite(t.grad).all() for t in leaves)


@needs_ext
def test_mixed_dtypes_are_promoted():
    g = torch.Generator().manual_seed(12)
    value, shapes, start, loc, attn = make_case(g, 1, 4, 2, 3, [(3, 3)], 2)
    out = ms_deform_attn(value.float(), shapes, start, loc, attn.float())
    assert out.dtype == torch.float64
    assert_close(
        out,
        ms_deform_attn_pytorch(value.float().double(), shapes, start, loc, attn.float().double()),
        1e-6,
        "output",
    )


@needs_ext
def test_empty_and_nan_inputs():
    g = torch.Generator().manual_seed(13)
    value, shapes, start, loc, attn = make_case(g, 2, 5, 2, 3, [(3, 3), (1, 2)], 2)
    out = ms_deform_attn(value, shapes, start, loc[:, :0], attn[:, :0])
    assert out.shape == (2, 0, 6)
    out = ms_deform_attn(value[:0], shapes, start, loc[:0], attn[:0])
    assert out.shape == (0, 5, 6)
    nan_loc = torch.full_like(loc, math.nan)
    assert torch.equal(
        ms_deform_attn(value, shapes, start, nan_loc, attn), torch.zeros(2, 5, 6, dtype=value.dtype)
    )


# ------------------------------------------------------------------------------------------ bad inputs
def _good():
    g = torch.Generator().manual_seed(14)
    return list(make_case(g, 2, 4, 2, 3, [(3, 4), (2, 2)], 2))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][..., 0]), "value must be"),
        (lambda a: a.__setitem__(3, a[3][..., 0]), "sampling_locations must be"),
        (lambda a: a.__setitem__(3, a[3][:1]), "does not match value"),
        (lambda a: a.__setitem__(4, a[4][..., :1]), "attention_weights must be"),
        (lambda a: a.__setitem__(1, a[1][:1]), "spatial_shapes must be"),
        (lambda a: a.__setitem__(2, a[2][:1]), "level_start_index must be"),
    ],
)
def test_python_shape_errors(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*args)


def test_python_im2col_step_error():
    with pytest.raises(ValueError, match="im2col_step"):
        ms_deform_attn(*_good(), 0)


@needs_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (
            lambda a: a.__setitem__(1, torch.tensor([[3, 4], [2, 3]])),
            "value has S=16 positions but spatial_shapes",
        ),
        (lambda a: a.__setitem__(2, torch.tensor([0, 11])), r"level_start_index\[1\] = 11"),
        (lambda a: a.__setitem__(1, a[1].int()), "spatial_shapes must be int64"),
        (lambda a: a.__setitem__(2, a[2].int()), "level_start_index must be int64"),
        (lambda a: a.__setitem__(1, torch.tensor([[4, 4], [0, 2]])), r"spatial_shapes\[1\] = \(0, 2\)"),
        (lambda a: a.__setitem__(3, a[3].float()), "sampling_locations dtype Float != value dtype Double"),
        (lambda a: a.__setitem__(4, a[4].float()), "attention_weights dtype Float != value dtype Double"),
        (lambda a: a.__setitem__(4, a[4][:, :, :, :, :1]), "does not match sampling_locations shape"),
        (lambda a: a.__setitem__(3, a[3][:, :, :1]), "n_heads mismatch"),
        (lambda a: a.__setitem__(3, a[3][:1]), "batch mismatch"),
        (lambda a: a.__setitem__(0, a[0][0]), "value must be 4-D"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), "spatial_shapes is on meta"),
        (lambda a: a.__setitem__(0, a[0].long()), "value must be a floating-point tensor"),
    ],
)
def test_cpp_errors_name_the_problem(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        _C.ms_deform_attn_forward(*args, 64)


@needs_ext
def test_cpp_backward_and_step_errors():
    args = _good()
    with pytest.raises(RuntimeError, match="im2col_step must be"):
        _C.ms_deform_attn_forward(*args, 0)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        _C.ms_deform_attn_backward(*args, torch.zeros(2, 4, 5, dtype=torch.float64), 64)
    with pytest.raises(RuntimeError, match="grad_output dtype"):
        _C.ms_deform_attn_backward(*args, torch.zeros(2, 4, 6), 64)


@needs_ext
def test_module_uses_kernel_and_matches_reference(monkeypatch):
    import sys

    from ddetr_d2.ops.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).double()
    shapes = torch.tensor([[5, 7], [3, 2]])
    S = 41
    query = torch.randn(2, 6, 32, dtype=torch.float64)
    src = torch.randn(2, S, 32, dtype=torch.float64)
    ref_pts = torch.rand(2, 6, 2, 2, dtype=torch.float64)
    out = attn(query, ref_pts, src, shapes, level_index(shapes))
    # the package attribute `ms_deform_attn` is the function; patch the module file's global
    module_file = sys.modules["ddetr_d2.ops.ms_deform_attn"]
    monkeypatch.setattr(module_file, "ms_deform_attn", ms_deform_attn_pytorch)
    ref = attn(query, ref_pts, src, shapes, level_index(shapes))
    assert_close(out, ref, 1e-12, "module output")


# ------------------------------------------------------------------------------------------- fallback
@pytest.fixture
def missing_extension(monkeypatch):
    _extension.reset()
    monkeypatch.setattr(_extension, "_load", _fake_failed_load)
    monkeypatch.delenv("DDETR_REQUIRE_EXTENSION", raising=False)
    yield
    monkeypatch.undo()
    _extension.reset()


def _fake_failed_load():
    _extension._extension = None
    _extension._error = "ImportError: simulated missing ddetr_d2._C"


def test_fallback_warns_once_and_matches(missing_extension):
    g = torch.Generator().manual_seed(15)
    inputs = make_case(g, 2, 10, 2, 4, [(4, 6), (1, 3)], 2)
    with pytest.warns(UserWarning, match="simulated missing ddetr_d2._C") as record:
        out1 = ms_deform_attn(*inputs)
        out2 = ms_deform_attn(*inputs)
    assert sum("pure-PyTorch" in str(w.message) for w in record) == 1
    ref = ms_deform_attn_pytorch(*inputs)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    if _C is not None:  # and the kernel agrees with the fallback
        assert_close(_C.ms_deform_attn_forward(*inputs, 64), ref, 1e-12, "kernel vs fallback")


def test_fallback_can_be_made_an_error(missing_extension, monkeypatch):
    monkeypatch.setenv("DDETR_REQUIRE_EXTENSION", "1")
    with pytest.raises(ImportError, match="DDETR_REQUIRE_EXTENSION=1"):
        ms_deform_attn(*_good())


def test_ops_import_with_torch_alone():
    """With detectron2 made unimportable, ddetr_d2.ops still imports and runs."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['detectron2'] = None\n"  # `import detectron2` now raises ImportError
        "import torch, ddetr_d2.ops as ops\n"
        "v = torch.zeros(1, 1, 1, 2); s = torch.tensor([[1, 1]]); i = torch.tensor([0])\n"
        "out = ops.ms_deform_attn(v, s, i, torch.full((1, 1, 1, 1, 1, 2), 0.5), torch.ones(1, 1, 1, 1, 1))\n"
        "assert out.shape == (1, 1, 2) and 'fvcore' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
