"""The fused Hadamard + quantize Triton kernel against the plain-torch composition.

On the CPU the kernels run through the Triton interpreter: `hadamard_quantize_triton` builds a
`triton.runtime.interpreter.InterpretedFunction` of each kernel for CPU tensors, so nothing here
sets TRITON_INTERPRET (which would turn every kernel decorated later in this pytest process into
an interpreted one, GPU tests included). The GPU tests run the compiled kernel on CUDA.
"""

import itertools
import math

import pytest
import torch

from halo_compile.kernels.hadamard import block_hadamard
from halo_compile.kernels.triton_hadamard_quantize import (
    GPU_CONFIGS,
    _hadamard_quantize_impl,
    hadamard_quantize,
    hadamard_quantize_dual_reference,
    hadamard_quantize_dual_triton,
    hadamard_quantize_reference,
    hadamard_quantize_triton,
    launch_grid,
)

FMTS = ("fp8_e4m3", "int8")
GRANULARITIES = ("row", "tensor")

# (M, K, block): M not a multiple of the kernel's BLOCK_M, every listed block that divides K.
BLOCKS = {16: (0, 16), 48: (0, 16), 256: (0, 16, 64, 256), 768: (0, 16, 64, 256)}
CASES = [(m, k, b) for m in (1, 7, 33, 130) for k, blocks in BLOCKS.items() for b in blocks]


def _input(m, k, dtype, seed, outliers, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:
        channels = torch.randperm(k, generator=g)[: max(1, k // 64)]
        x[:, channels] *= 100.0
    return x.to(device=device, dtype=dtype)


def _ordinal(q):
    """Integers in which neighbouring representable values differ by one: the INT8 value itself,
    and for FP8 E4M3 the sign-magnitude byte as a signed magnitude (+0 and -0 both give 0)."""
    if q.dtype == torch.int8:
        return q.to(torch.int32)
    raw = q.view(torch.uint8).to(torch.int32)
    mag = raw & 0x7F
    return torch.where(raw >= 0x80, -mag, mag)


def _compare(q, s, q_ref, s_ref, scale_rtol=1e-6):
    """Scales equal to rel `scale_rtol`; values equal except neighbours (one quantum apart).
    Returns the number of values that differ."""
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=scale_rtol, atol=0)
    diff = (_ordinal(q) - _ordinal(q_ref)).abs()
    assert int(diff.max()) <= 1, f"values differ by {int(diff.max())} quanta"
    return int((diff != 0).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("m,k,block", CASES)
def test_interpreter_matches_reference(m, k, block, dtype):
    # Two of the four (format, granularity) pairs per test, the other two with the other dtype:
    # every (M, K, block) meets all four, and the interpreter run stays short.
    pairs = [(f, g) for f in FMTS for g in GRANULARITIES]
    half = (CASES.index((m, k, block)) + (dtype == torch.float32)) % 2
    mismatches = total = 0
    for i, (fmt, gran) in enumerate((pairs[half], pairs[3 - half])):
        seed = 1000 * m + 10 * k + block + i + 2 * half
        x = _input(m, k, dtype, seed, outliers=bool(i % 2))
        q, s = hadamard_quantize_triton(x, fmt, gran, block)
        q_ref, s_ref = hadamard_quantize_reference(x, fmt, gran, block)
        mismatches += _compare(q, s, q_ref, s_ref)
        total += q.numel()
    if block == 0:  # no rotation: the same float32 operations as the reference
        assert mismatches == 0
    assert mismatches <= max(2, total // 1000), f"{mismatches} of {total} values one quantum off"


@pytest.mark.parametrize("block_m,nt", [(1, 1), (2, 4), (4, 1)])
def test_interpreter_gpu_like_launch_configs(block_m, nt):
    """The GPU's small configurations (one row, a few tiles per program) mask the same way."""
    for m, k, block in ((7, 768, 256), (3, 48, 16), (5, 1280, 128)):
        for fmt, gran in (("fp8_e4m3", "row"), ("int8", "tensor")):
            x = _input(m, k, torch.bfloat16, m + k, outliers=True)
            q, s = hadamard_quantize_triton(x, fmt, gran, block, block_m=block_m, nt=nt)
            assert _compare(q, s, *hadamard_quantize_reference(x, fmt, gran, block)) <= 2


# (lines, K, block, split): the transposed-view and dim-0 variants; split > 1 makes programs
# share a scale (partial absmaxes per split, then a second launch).
# Block 0 takes a kernel of its own (tiles of 8 lines x 16 K indices in the interpreter): odd
# sizes, several splits, and an unmasked (EVEN) case.
STRIDED_CASES = [(33, 256, 64, 1), (130, 768, 256, 2), (7, 48, 16, 3), (40, 512, 0, 2),
                 (33, 100, 0, 3), (7, 5, 0, 1), (16, 64, 0, 2)]


@pytest.mark.parametrize("lines,k,block,split", STRIDED_CASES)
def test_interpreter_transposed_view(lines, k, block, split):
    """dYᵀ / Xᵀ for grad-weight: a transposed view [lines, K] with stride (1, lines) is read in
    place; the output is the contiguous quantized transpose, rotated along K (the tokens)."""
    for i, (fmt, gran) in enumerate([(f, g) for f in FMTS for g in GRANULARITIES]):
        base = _input(k, lines, torch.bfloat16 if i % 2 else torch.float32, lines + k + i,
                      outliers=True)
        x = base.t()
        assert x.stride() == (1, lines)
        q, s = hadamard_quantize_triton(x, fmt, gran, block, split=split)
        assert q.is_contiguous() and q.shape == (lines, k)
        q_ref, s_ref = hadamard_quantize_reference(x, fmt, gran, block)
        mismatches = _compare(q, s, q_ref, s_ref)
        assert mismatches <= (0 if block == 0 else max(2, q.numel() // 1000))


# (tokens, features, block, split): a program owns 256 tokens and loops over its split of the
# features; the last two are unmasked (EVEN), with several iterations or an uneven last split.
DIM0_CASES = [(256, 33, 64, 1), (768, 130, 256, 2), (48, 7, 16, 3), (512, 40, 0, 2),
              (256, 64, 128, 2), (512, 24, 256, 2)]


@pytest.mark.parametrize("m,n,block,split", DIM0_CASES)
def test_interpreter_dim0_outer_rotation(m, n, block, split):
    """The "outer" rotation: H along dim 0 (tokens), still one scale per row of the result."""
    for i, (fmt, gran) in enumerate([(f, g) for f in FMTS for g in GRANULARITIES]):
        x = _input(m, n, torch.bfloat16 if i % 2 else torch.float32, m + n + i, outliers=False)
        x[torch.randperm(m, generator=torch.Generator().manual_seed(i))[: max(1, m // 64)]] *= 100
        q, s = hadamard_quantize_triton(x, fmt, gran, block, dim=0, split=split)
        assert q.is_contiguous() and q.shape == (m, n)
        q_ref, s_ref = hadamard_quantize_reference(x, fmt, gran, block, dim=0)
        assert s.shape == s_ref.shape == ((m, 1) if gran == "row" else (1, 1))
        mismatches = _compare(q, s, q_ref, s_ref)
        assert mismatches <= (0 if block == 0 else max(2, q.numel() // 1000))
    # ...and dim=0 rotates: the quantized values differ from the unrotated ones.
    if block:
        assert not torch.equal(q, hadamard_quantize_reference(x, fmt, gran, 0)[0])


# Llama-3-8B operands at 8192 tokens, as the kernel sees them: (M lines, K, layout).
LAUNCHES = [(8192, 4096, "rows"), (4096, 8192, "transposed"), (14336, 8192, "transposed"),
            (4096, 8192, "outer"), (14336, 8192, "outer"), (1000, 300, "outer")]


@pytest.mark.parametrize("sms", [132, 78])
@pytest.mark.parametrize("lines,k,layout", LAUNCHES)
def test_launch_grid_covers_the_work_in_one_wave(lines, k, layout, sms):
    """The GPU launches split their loop until the layout's programs per SM, never beyond: a
    program more than fit at once is a second wave (dim 0 at 14336 features once had 288
    programs for 264 places). Every line block / K tile is covered exactly once."""
    block_m, nt, _, per_sm = GPU_CONFIGS[layout]
    per_k = layout == "outer"
    want = per_sm * sms
    (programs, splits), per_split = launch_grid(lines, k, block_m, nt, per_k, want=want)
    unit = block_m if per_k else nt * 256
    loop_extent = lines if per_k else k
    assert programs == -(-(k if per_k else lines) // (256 if per_k else block_m))
    assert per_split % unit == 0 and (splits - 1) * per_split < loop_extent <= splits * per_split
    if programs < want // 2:
        assert splits > 1 and programs * splits <= want
    else:
        assert splits == 1
    if (lines, k, layout, sms) == (14336, 8192, "outer", 132):
        assert (programs, splits) == (32, 8)


def test_launch_grid_takes_a_given_split():
    assert launch_grid(4096, 8192, 64, 1, True, split=3, want=264) == ((32, 3), 1408)
    assert launch_grid(64, 1024, 16, 1, False, split=99) == ((4, 4), 256)  # at most one per tile


def test_interpreter_split_row_launch():
    """Row-major input with K split over programs: same values as the one-launch path."""
    x = _input(9, 1280, torch.bfloat16, 21, outliers=True)
    for fmt in FMTS:
        q1, s1 = hadamard_quantize_triton(x, fmt, "row", 128)
        q2, s2 = hadamard_quantize_triton(x, fmt, "row", 128, split=3)
        assert torch.equal(s1, s2) and torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))


def test_interpreter_cuda_style_scale():
    """On CUDA the kernel computes the scale as torch does there, amax * float32(1 / max)."""
    x = _input(33, 256, torch.bfloat16, 7, outliers=True)
    for fmt, max_value in (("fp8_e4m3", 448.0), ("int8", 127.0)):
        q, s = hadamard_quantize_triton(x, fmt, "row", 0, recip_scale=True)
        amax = x.float().abs().amax(dim=1, keepdim=True)
        expected = amax * (torch.ones((), dtype=torch.float32) / max_value)
        assert torch.equal(s, expected)
        scaled = (x.float() / expected).clamp(-max_value, max_value)
        q_ref = torch.round(scaled).to(torch.int8) if fmt == "int8" else scaled.to(q.dtype)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_interpreter_fp16_and_strided_input():
    base = _input(9, 512, torch.float16, 3, outliers=True)
    x = base[:, 128:384]  # row stride 512
    for fmt in FMTS:
        q, s = hadamard_quantize_triton(x, fmt, "row", 128)
        _compare(q, s, *hadamard_quantize_reference(x, fmt, "row", 128))
        # Every other column (strides (512, 2)), not rotated: the strided kernel, bit for bit.
        q, s = hadamard_quantize_triton(base[:, ::2], fmt, "row", 0)
        assert _compare(q, s, *hadamard_quantize_reference(base[:, ::2], fmt, "row", 0)) == 0


def test_kernels_format_constants_are_torchs():
    """The kernels spell each format's max value and float32(1 / max), as torch computes the
    reciprocal on CUDA, as literals (Inductor re-emits a kernel without its module's floats)."""
    import inspect

    from halo_compile.kernels import (
        triton_columns_quantize,
        triton_rows_quantize,
        triton_transpose_quantize,
    )
    from halo_compile.kernels.quantize import FORMATS

    for module in (triton_rows_quantize, triton_columns_quantize, triton_transpose_quantize):
        source = inspect.getsource(module)
        for fmt in FMTS:
            max_value = FORMATS[fmt].max_value
            inverse = (torch.ones((), dtype=torch.float32) / max_value).item()
            assert repr(float(max_value)) in source and repr(inverse) in source, (module, fmt)


def _all_e4m3_test_values():
    """Every finite E4M3 value, the midpoints between neighbours (ties), and the floats just
    beside each midpoint, all positive and negative, in a row whose absmax is 448 (scale 1)."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2
    below = torch.nextafter(mids, torch.zeros_like(mids))
    above = torch.nextafter(mids, torch.full_like(mids, 1000.0))
    row = torch.cat([vals, mids, below, above, torch.tensor([0.0, 1e-30, 447.99, 448.0])])
    return torch.cat([row, -row])


def test_soft_fp8_rounding_is_exact():
    """The integer E4M3 conversion used under the interpreter rounds like torch's cast: ties to
    even, subnormals, carries into the exponent, the largest value."""
    row = _all_e4m3_test_values()
    k = -row.numel() % 16 + row.numel()
    x = torch.zeros(2, k)
    x[0, : row.numel()] = row
    x[1, : row.numel()] = row.flip(0)
    q, s = hadamard_quantize_triton(x, "fp8_e4m3", "tensor", 0)
    assert float(s) == 1.0
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_int8_rounds_half_to_even():
    ties = torch.arange(-126.5, 127.0, 1.0)
    x = torch.cat([ties, torch.tensor([127.0, -127.0, 0.5, -0.5, 1.5, 2.5])])
    x = torch.cat([x, torch.zeros(-x.numel() % 16)]).reshape(1, -1)
    q, s = hadamard_quantize_triton(x, "int8", "row", 0)
    assert float(s) == 1.0
    assert torch.equal(q, torch.round(x).to(torch.int8))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_zero_rows_and_nonfinite_rows():
    x = torch.randn(5, 64)
    x[1] = 0.0
    x[3, 7] = float("nan")
    x[4, 0] = float("inf")
    # As rows rotated, and (the unrotated strided kernel) as a transposed view not rotated.
    for fmt, (layout, block) in itertools.product(FMTS, [(x, 64), (x.t().contiguous().t(), 0)]):
        q, s = hadamard_quantize_triton(layout, fmt, "row", block)
        assert float(s[1]) == 1e-12 / (448.0 if fmt == "fp8_e4m3" else 127.0) or math.isclose(
            float(s[1]), torch.tensor(1e-12).div(448.0 if fmt == "fp8_e4m3" else 127.0).item())
        assert torch.all(q[1].float() == 0)
        assert torch.isfinite(s[[0, 1, 2]]).all()
        assert not torch.isfinite(s[3]).any() and not torch.isfinite(s[4]).any()
        _, st = hadamard_quantize_triton(layout, fmt, "tensor", block)
        assert not torch.isfinite(st).any()


def test_bad_arguments():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "fp8_e4m3", "row", 32)  # 32 does not divide 48
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "fp8_e4m3", "row", 8)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "fp4", "row", 16)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "int8", "column", 16)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x.to(torch.float64), "int8", "row", 16)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "int8", "row", 16, dim=2)
    with pytest.raises(ValueError):
        hadamard_quantize_triton(x, "int8", "row", 16, dim=0)  # 16 does not divide 4 rows


def test_custom_op_on_cpu_is_the_reference():
    x = _input(7, 256, torch.bfloat16, 11, outliers=True)
    for fmt in FMTS:
        for gran in GRANULARITIES:
            q, s = torch.ops.halo.hadamard_quantize(x, fmt, gran, 64)
            q_ref, s_ref = hadamard_quantize_reference(x, fmt, gran, 64)
            assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    assert hadamard_quantize is not None


def test_dual_op_on_cpu_is_the_reference_and_traces_with_fake_tensors():
    x = _input(256, 96, torch.bfloat16, 13, outliers=True)
    for fmt in FMTS:
        got = torch.ops.halo.hadamard_quantize_dual(x, fmt, 128)
        for mine, theirs in zip(got, hadamard_quantize_dual_reference(x, fmt, 128), strict=False):
            assert torch.equal(mine.float(), theirs.float())
    with torch._subclasses.FakeTensorMode():
        q, s, qt, st = torch.ops.halo.hadamard_quantize_dual(
            torch.empty(512, 96, dtype=torch.bfloat16), "int8", 256)
        assert q.shape == (512, 96) and qt.shape == (96, 512) and qt.is_contiguous()
        assert s.shape == (512, 1) and st.shape == (96, 1) and q.dtype == qt.dtype == torch.int8


def test_dual_rejects_what_it_cannot_quantize():
    x = _input(48, 256, torch.float32, 14, outliers=False)
    with pytest.raises(ValueError, match="block 32 does not divide 48"):
        hadamard_quantize_dual_triton(x, "fp8_e4m3", 32)  # the tokens' block
    with pytest.raises(ValueError, match="unknown format"):
        hadamard_quantize_dual_triton(x, "fp4", 16)
    with pytest.raises(ValueError, match="dim 0 and row scales"):
        _hadamard_quantize_impl(lambda *a: None, x, "int8", "tensor", 16, 0, dual=True)


def test_custom_op_traces_with_fake_tensors():
    def f(x):
        q, s = torch.ops.halo.hadamard_quantize(x, "fp8_e4m3", "row", 64)
        return q.float() * s

    x = _input(7, 128, torch.bfloat16, 12, outliers=False)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    with torch._subclasses.FakeTensorMode():
        fx = torch.empty(9, 256, dtype=torch.bfloat16)
        for gran, sshape in (("row", (9, 1)), ("tensor", (1, 1))):
            q, s = torch.ops.halo.hadamard_quantize(fx, "int8", gran, 256)
            assert q.shape == (9, 256) and q.dtype == torch.int8
            assert s.shape == sshape and s.dtype == torch.float32


def _compare_dual(x, fmt, block, **launch):
    """The dual output against the reference's two quantizations, and its grad-input half
    against the single dim 0 launch's. Returns the values one quantum off."""
    q, s, qt, st = hadamard_quantize_dual_triton(x, fmt, block, **launch)
    q_ref, s_ref, qt_ref, st_ref = hadamard_quantize_dual_reference(x, fmt, block)
    assert qt.is_contiguous() and qt.shape == x.t().shape and st.shape == (x.shape[1], 1)
    single = hadamard_quantize_triton(x, fmt, "row", block, dim=0, **launch)
    assert torch.equal(_ordinal(q), _ordinal(single[0])) and torch.equal(s, single[1])
    # A scale of a rotated line is one rotated value, summed in another float32 order than the
    # reference's: with outliers, a few ulps apart (2.9e-6 seen at block 128).
    return (_compare(q, s, q_ref, s_ref, scale_rtol=4e-6)
            + _compare(qt, st, qt_ref, st_ref, scale_rtol=4e-6))


# (tokens, features, block, split): dY for grad-input and dYᵀ for grad-weight at once, dim 0's
# launch: features not a multiple of BLOCK_M, tokens not of 256, split lines, no rotation.
DUAL_CASES = [(256, 256, 256, None), (512, 384, 64, 2), (48, 128, 16, 3), (640, 72, 128, 2),
              (300, 40, 0, None)]


@pytest.mark.parametrize("m,n,block,split", DUAL_CASES)
def test_interpreter_dual_matches_both_references(m, n, block, split):
    for i, fmt in enumerate(FMTS):
        x = _input(m, n, torch.float32 if i else torch.bfloat16, m + n + i, outliers=True)
        mismatches = _compare_dual(x, fmt, block, split=split)
        assert mismatches <= (0 if block == 0 else max(2, 2 * x.numel() // 1000))


# ---------------------------------------------------------------------------------------------
# Stochastic rounding: random, so compared with the exact values statistically


def _grid_spacing(e, fmt):
    """The distance between the two representable values around `e` (scaled units)."""
    if fmt == "int8":
        return torch.ones_like(e)
    return torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(2.0**-6))) - 3)


def _repeats(unit, copies, layout):
    """`copies` stacked copies of `unit` [u, k] along dim 0 (rotated along dim 0 within blocks
    of u tokens, each copy rotates alike): laid out contiguously, or as a transposed view."""
    x = unit.repeat(copies, 1)
    return x.t().contiguous().t() if layout == "transposed" else x


def _check_stochastic(q, s, q_nearest, s_nearest, exact, copies):
    """q [copies * u, k] (or its transpose's layout: pass both transposed) stochastically rounded,
    q_nearest rounded to nearest, `exact` [copies * u, k] the float64 rotated values over their
    scales. Checks the scales equal the nearest-rounding ones, every value is one of the two
    representable neighbours of the exact one, and the mean over the copies is unbiased."""
    fmt = "int8" if q.dtype == torch.int8 else "fp8_e4m3"
    assert torch.equal(s, s_nearest)
    steps = _ordinal(q) - _ordinal(q_nearest)
    assert int(steps.abs().max()) <= 1
    v, vn = q.double(), q_nearest.double()
    moved = steps != 0  # then on the other side of the exact value than the nearest one
    slack = 1e-5 * exact.abs() + 1e-9
    assert bool(((v - exact) * (vn - exact) <= slack * (v - vn).abs())[moved].all())
    shape = (copies, -1, exact.shape[1])
    e, spacing = exact.reshape(shape)[0], _grid_spacing(exact.reshape(shape)[0], fmt)
    # (E4M3's subnormals, |e| < 2^-6, are rounded to nearest by both: see quantize.py.)
    normal = e.abs() >= 2.0**-6 if fmt == "fp8_e4m3" else torch.ones_like(e, dtype=torch.bool)
    bias = ((v.reshape(shape).mean(0) - e).abs() / spacing)[normal]
    bias_nearest = ((vn.reshape(shape)[0] - e).abs() / spacing)[normal]
    # One draw's variance is at most spacing^2 / 4: the mean of `copies` draws is within
    # spacing / (2 sqrt(copies)) per standard error; nearest rounding is off by ~spacing / 4.
    stderr = 1 / (2 * copies**0.5)
    assert float(bias.max()) < 6 * stderr, float(bias.max())
    assert float(bias.mean()) < 1.5 * stderr
    assert float(bias_nearest.mean()) > 0.15


def _exact(x, s, block, dim):
    rotated = block_hadamard(x.double(), block, dim=dim) if block else x.double()
    return rotated / s.double()


def _check_stochastic_quantization(layout, u, k, block, dim, copies, fmt, device="cpu"):
    """`copies` of a [u, k] unit quantized stochastically (`_check_stochastic`); the same numbers
    again under the same torch.manual_seed, others without it."""
    x = _repeats(_input(u, k, torch.bfloat16, u + k + block, outliers=True, device=device),
                 copies, layout)
    torch.manual_seed(0)
    q, s = hadamard_quantize_triton(x, fmt, "row", block, dim, "stochastic")
    q_nearest, s_nearest = hadamard_quantize_triton(x, fmt, "row", block, dim)
    _check_stochastic(q, s, q_nearest, s_nearest, _exact(x, s, block, dim), copies)
    torch.manual_seed(0)
    assert torch.equal(_ordinal(hadamard_quantize_triton(x, fmt, "row", block, dim,
                                                         "stochastic")[0]), _ordinal(q))
    assert not torch.equal(_ordinal(hadamard_quantize_triton(x, fmt, "row", block, dim,
                                                             "stochastic")[0]), _ordinal(q))


def _check_dual_stochastic(fmt, block, features, copies, device="cpu"):
    """The dual kernel's two outputs, each checked as `_check_stochastic` does."""
    x = _repeats(_input(block, features, torch.bfloat16, block + features, outliers=True,
                        device=device), copies, "rows")
    q, s, qt, st = hadamard_quantize_dual_triton(x, fmt, block, "stochastic")
    qn, sn, qtn, stn = hadamard_quantize_dual_triton(x, fmt, block)
    _check_stochastic(q, s, qn, sn, _exact(x, s, block, 0), copies)
    # The transpose: each feature's line holds the copies one after the other along the tokens;
    # regrouped as [copies * features, block], copy-major as `_check_stochastic` takes them.
    rotated_t = block_hadamard(x.double(), block, dim=0).t() / st.double()

    def by_copy(t):
        return t.reshape(-1, copies, block).transpose(0, 1).reshape(-1, block)

    _check_stochastic(by_copy(qt), st, by_copy(qtn), stn, by_copy(rotated_t), copies)
    # Both halves draw their own numbers: the transpose is not q's values transposed.
    assert (_ordinal(qt.t()) != _ordinal(q)).any()


# (layout, u, k, block, dim, copies): `copies` of a [u, k] unit (dim 0 rotates along blocks of
# u tokens); fewer copies where the interpreter is slow (more programs, small tiles).
SR_CASES = [("rows", 1, 256, 0, 1, 256), ("rows", 1, 256, 64, 1, 256),
            ("rows", 3, 768, 256, 1, 256), ("transposed", 2, 64, 0, 1, 128),
            ("transposed", 1, 256, 16, 1, 256), ("rows", 16, 40, 16, 0, 128),
            ("rows", 32, 24, 32, 0, 128)]


@pytest.mark.parametrize("layout,u,k,block,dim,copies", SR_CASES)
@pytest.mark.parametrize("fmt", FMTS)
def test_interpreter_stochastic_rounding_is_unbiased(layout, u, k, block, dim, copies, fmt):
    _check_stochastic_quantization(layout, u, k, block, dim, copies, fmt)


@pytest.mark.parametrize("fmt", FMTS)
def test_interpreter_stochastic_rounding_tensor_scale_and_split(fmt):
    copies = 128
    x = _repeats(_input(1, 512, torch.float32, 3, outliers=True), copies, "rows")
    q, s = hadamard_quantize_triton(x, fmt, "tensor", 128, 1, "stochastic", split=2)
    q_nearest, s_nearest = hadamard_quantize_triton(x, fmt, "tensor", 128, 1, split=2)
    _check_stochastic(q, s, q_nearest, s_nearest, _exact(x, s, 128, 1), copies)


@pytest.mark.parametrize("fmt", FMTS)
def test_interpreter_dual_stochastic_rounding(fmt):
    _check_dual_stochastic(fmt, block=32, features=48, copies=128)


def test_stochastic_rounding_op_on_cpu_and_fake():
    x = _input(64, 128, torch.bfloat16, 5, outliers=True)
    torch.manual_seed(3)
    q, s = torch.ops.halo.hadamard_quantize(x, "fp8_e4m3", "row", 64, 1, "stochastic")
    torch.manual_seed(3)
    q_ref, s_ref = hadamard_quantize_reference(x, "fp8_e4m3", "row", 64, 1, "stochastic")
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    assert not torch.equal(q.float(), hadamard_quantize_reference(x, "fp8_e4m3", "row", 64)[0]
                           .float())
    with torch._subclasses.FakeTensorMode():
        q, s, qt, st = torch.ops.halo.hadamard_quantize_dual(
            torch.empty(512, 96, dtype=torch.bfloat16), "int8", 256, "stochastic")
        assert qt.shape == (96, 512) and q.dtype == torch.int8
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        hadamard_quantize_triton(x, "int8", "row", 0, 1, "up")


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(8192, 4096), (8191, 14336)])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("gran", GRANULARITIES)
def test_gpu_matches_reference(m, k, fmt, gran):
    x = _input(m, k, torch.bfloat16, 0, outliers=True, device="cuda")
    q, s = torch.ops.halo.hadamard_quantize(x, fmt, gran, 256)
    q_ref, s_ref = hadamard_quantize_reference(x, fmt, gran, 256)
    mismatches = _compare(q, s, q_ref, s_ref)
    assert mismatches <= q.numel() // 10000, f"{mismatches} of {q.numel()} one quantum off"


@pytest.mark.gpu
@pytest.mark.parametrize("block", [0, 16, 32, 128, 256])
def test_gpu_float32_and_small_blocks(block):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for fmt in FMTS:
            x = _input(1031, 2048, dtype, 1, outliers=True, device="cuda")
            q, s = hadamard_quantize_triton(x, fmt, "row", block)
            mismatches = _compare(q, s, *hadamard_quantize_reference(x, fmt, "row", block))
            assert mismatches <= q.numel() // 10000
            if block == 0:
                assert mismatches == 0


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["transposed", "dim0"])
@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "row"), ("int8", "tensor"), ("int8", "row")])
def test_gpu_grad_layouts_match_reference(variant, fmt, gran):
    """Real shapes of the backward's operands: dYᵀ of dY [8192, 4095 + 1] read in place
    (grad-weight, rotation along tokens) and dY rotated along tokens (grad-input "outer")."""
    for tokens, width, block in ((8192, 4096, 256), (4100, 1000, 0), (2048, 336, 128),
                                 (8191, 4096, 0)):
        dy = _input(tokens, width, torch.bfloat16, tokens + width, outliers=True, device="cuda")
        x, dim = (dy.t(), 1) if variant == "transposed" else (dy, 0)
        q, s = hadamard_quantize_triton(x, fmt, gran, block, dim)
        assert q.is_contiguous() and q.shape == x.shape
        mismatches = _compare(q, s, *hadamard_quantize_reference(x, fmt, gran, block, dim))
        assert mismatches <= (0 if block == 0 else q.numel() // 10000)


@pytest.mark.gpu
def test_gpu_dual_matches_both_references():
    """dY [tokens, features] at the backward's real shapes and at odd sizes."""
    for fmt in FMTS:
        for tokens, width, block in ((8192, 14336, 256), (8192, 4096, 256), (4352, 1000, 128)):
            dy = _input(tokens, width, torch.bfloat16, tokens + width, outliers=True,
                        device="cuda")
            assert _compare_dual(dy, fmt, block) <= 2 * dy.numel() // 10000


@pytest.mark.gpu
def test_gpu_grad_layouts_in_compiled_graph():
    def f(dy):
        q1, s1 = torch.ops.halo.hadamard_quantize(dy.t(), "fp8_e4m3", "row", 256)
        q2, s2 = torch.ops.halo.hadamard_quantize(dy, "fp8_e4m3", "row", 256, 0)
        return q1.float() * s1, q2.float() * s2

    dy = _input(512, 384, torch.bfloat16, 6, outliers=True, device="cuda")
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(dy), f(dy), strict=False):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# (layout, u, k, block, dim, copies) at GPU sizes: rows of a decoder layer's widths, the
# transposed views (rotated, and the unrotated transpose kernel), dim 0.
GPU_SR_CASES = [("rows", 1, 4096, 256, 1, 1024), ("rows", 2, 14336, 0, 1, 512),
                ("transposed", 4, 2048, 0, 1, 512), ("transposed", 2, 1024, 256, 1, 512),
                ("rows", 64, 1024, 64, 0, 256), ("rows", 256, 96, 256, 0, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout,u,k,block,dim,copies", GPU_SR_CASES)
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_stochastic_rounding_is_unbiased(layout, u, k, block, dim, copies, fmt):
    _check_stochastic_quantization(layout, u, k, block, dim, copies, fmt, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_dual_stochastic_rounding(fmt):
    _check_dual_stochastic(fmt, block=256, features=512, copies=128, device="cuda")


@pytest.mark.gpu
def test_gpu_soft_fp8_equals_native_conversion():
    x = _input(513, 4096, torch.bfloat16, 2, outliers=True, device="cuda")
    q1, s1 = hadamard_quantize_triton(x, "fp8_e4m3", "row", 256, soft_fp8=False)
    q2, s2 = hadamard_quantize_triton(x, "fp8_e4m3", "row", 256, soft_fp8=True)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    row = _all_e4m3_test_values().cuda()
    xe = torch.zeros(1, -row.numel() % 16 + row.numel(), device="cuda")
    xe[0, : row.numel()] = row
    for soft in (False, True):
        q, s = hadamard_quantize_triton(xe, "fp8_e4m3", "tensor", 0, soft_fp8=soft)
        assert float(s) == 1.0
        assert torch.equal(q.view(torch.uint8), xe.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.gpu
def test_gpu_op_in_compiled_graph():
    def f(x):
        q, s = torch.ops.halo.hadamard_quantize(x, "fp8_e4m3", "row", 256)
        return q.float() * s

    x = _input(300, 1024, torch.bfloat16, 4, outliers=True, device="cuda")
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
