"""Fused block-Hadamard rotation + FP8/INT8 quantization: the ops and their Python side.

`hadamard_quantize(x, fmt, granularity, block, dim)` computes what the plain-torch composition

    quantize(block_hadamard(x, block, dim=dim) if block else x.float(), fmt, granularity)

computes (hadamard.py, quantize.py), reading the bf16/fp16/fp32 input once per launch and
writing the FP8 E4M3 / INT8 values (contiguous, x's shape) and the float32 scales (one per row
of x, or one), with no rotated copy in between. Which kernel takes a call:
* dim=1, rows or any strided view read in place (a transpose: its quantized transpose, with no
  transposing pass): triton_rows_quantize.py, a scale per line;
* dim=1 on a strided view without rotation: triton_transpose_quantize.py;
* dim=0 (H along the tokens, a scale per row of x), and the dual output
  (`hadamard_quantize_dual`: dim 0's result and, from the same rotated tiles, the transpose
  with a scale per feature): triton_columns_quantize.py.
The launches' configurations are in hadamard_quantize_launch.py; why the kernels are built as
they are, and what they measure, in docs/design.md ("The quantize kernels").

On CPU tensors `hadamard_quantize_triton` runs the same kernels through Triton's interpreter
(triton_interpreter.py). `halo::hadamard_quantize` is a `torch.library.triton_op`: on CUDA it
launches the kernels (and Inductor sees them), on other devices it runs the reference; its fake
implementation is the same function run on fake tensors.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch.library import triton_op, wrap_triton

from .constants import FORMATS, MAX_BLOCK, ROUNDINGS
from .constants import MIN_AMAX as _MIN_AMAX
from .hadamard import block_hadamard
from .hadamard_quantize_launch import (  # noqa: F401  (GPU_CONFIGS, size_hint: imported from here)
    GPU_CONFIGS,
    INTERPRETER_TRANSPOSE_CONFIG,
    TRANSPOSE_CONFIG,
    LaunchOverrides,
    aligned,
    compile_options,
    launch_grid,
    layout_config,
    needs_int64,
    size_hint,
    wanted_programs,
)
from .quantize import quantize
from .triton_columns_quantize import _hadamard_quantize_columns_kernel
from .triton_interpreter import interpreted
from .triton_quantize_helpers import ABSMAX, ONE_LAUNCH, QUANTIZE, QUANTIZE_WITH_SCALE
from .triton_rows_quantize import _hadamard_quantize_rows_kernel
from .triton_transpose_quantize import _transpose_quantize_kernel

_KERNELS = (_hadamard_quantize_rows_kernel, _hadamard_quantize_columns_kernel,
            _transpose_quantize_kernel)
_JITTED = {fn: triton.jit(fn) for fn in _KERNELS}


def _check_args(x, fmt, granularity, block, dim=1, rounding="nearest"):
    if x.dim() != 2:
        raise ValueError(f"hadamard_quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hadamard_quantize: unsupported dtype {x.dtype}")
    if fmt not in FORMATS:
        raise ValueError(f"hadamard_quantize: unknown format {fmt!r}")
    if granularity not in ("row", "tensor"):
        raise ValueError(f"hadamard_quantize: unknown granularity {granularity!r}")
    if dim not in (0, 1):
        raise ValueError(f"hadamard_quantize: dim must be 0 or 1, got {dim!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"hadamard_quantize: unknown rounding {rounding!r}; allowed: "
                         f"{ROUNDINGS}")
    if block:
        if block < 16 or block > MAX_BLOCK or block & (block - 1):
            raise ValueError(f"hadamard_quantize: block must be 0 or a power of two in 16..256, "
                             f"got {block}")
        size = x.shape[dim]
        if isinstance(size, int) and size % block:
            raise ValueError(f"hadamard_quantize: block {block} does not divide {size}")
        torch._check(size % block == 0,
                     lambda: f"hadamard_quantize: block {block} does not divide {size}")



@dataclasses.dataclass(frozen=True)
class _Launch:
    """What every launch of one call shares: how a kernel function is launched
    (`launchable(kernel_fn)[grid](...)`), the overrides, and the constexprs of the numerics."""

    launchable: object
    overrides: LaunchOverrides
    interpret: bool
    seeds: torch.Tensor
    numerics: dict  # SOFT_FP8, RECIP_SCALE, STOCHASTIC

    def __call__(self, kernel_fn, grid, *args, options, **constexprs):
        self.launchable(kernel_fn)[grid](*args, **self.numerics, **constexprs, **options)


def _second_launch_scale(amax, granularity, spec):
    """The scales of a two-launch quantization, given the first launch's partial absmaxes
    [splits, lines]: with row scales an empty [lines, 1] that the second launch fills (it
    computes them from the partials, as the reference does); with a tensor scale, that scale."""
    if granularity == "row":
        return torch.empty((amax.shape[1], 1), dtype=torch.float32, device=amax.device)
    return (amax.amax().clamp_min(_MIN_AMAX) / spec.max_value).reshape(1, 1)


def _launch_seeds(x, rounding):
    """The seeds of a launch's random numbers ([2], int64: q's, the dual transpose's), drawn
    from torch's generator (so torch.manual_seed makes a quantization repeatable, and a compiled
    graph draws them as Inductor draws its own); with rounding to nearest none are read: a
    placeholder."""
    if rounding == "stochastic":
        return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=x.device)
    return x


_NO_OVERRIDES = LaunchOverrides()


def _rotation_constexprs(block):
    return {"HB": block, "INV_SQRT": 1.0 / math.sqrt(block) if block else 1.0}


def _hadamard_quantize_impl(launchable, x, fmt, granularity, block, dim=1, rounding="nearest",
                            *, dual=False, interpret=False, overrides=_NO_OVERRIDES):
    """`launchable(kernel_fn)`: what launches a kernel function here (its @triton.jit
    compilation, wrapped for a triton_op, or interpreted)."""
    _check_args(x, fmt, granularity, block, dim, rounding)
    if dual and (dim != 0 or granularity != "row"):
        raise ValueError("hadamard_quantize: the dual output needs dim 0 and row scales")
    torch._check(x.numel() >= 1, lambda: "hadamard_quantize: empty input")
    q = torch.empty(x.shape, dtype=FORMATS[fmt].dtype, device=x.device)
    numerics = {
        "SOFT_FP8": interpret if overrides.soft_fp8 is None else overrides.soft_fp8,
        "RECIP_SCALE": not interpret if overrides.recip_scale is None else overrides.recip_scale,
        "STOCHASTIC": rounding == "stochastic",
    }
    launch = _Launch(launchable, overrides, interpret, _launch_seeds(x, rounding), numerics)
    if dim == 0:  # the kernel rotates along K: dim 0 through the transposed view
        return _quantize_columns(launch, x.t(), q, fmt, granularity, block, dual)
    if x.stride(1) != 1 and not block:
        return _quantize_transposed(launch, x, q, fmt, granularity)
    return _quantize_rows(launch, x, q, fmt, granularity, block)


def _quantize_rows(launch, x, q, fmt, granularity, block):
    """dim 1: a scale per line of x (rows, or a strided view rotated). One launch when each
    program owns whole lines; else an ABSMAX launch (a row of partials per K split: nothing to
    zero, no atomics), then a QUANTIZE launch. Returns (q, scale)."""
    M, K = x.shape
    overrides = launch.overrides
    layout = "transposed" if x.stride(1) != 1 else "rows" if block else "rows, not rotated"
    config = layout_config(layout, launch.interpret)
    bm, nt = overrides.block_m or config.block_m, overrides.nt or config.nt
    want = wanted_programs(config.programs_per_sm, overrides, x.device)
    grid, per_split = launch_grid(M, K, bm, nt, False, overrides.split, want)

    def run(mode, scale, amax):
        launch(_hadamard_quantize_rows_kernel, grid, x, q, scale, amax, launch.seeds, M, K,
               x.stride(0), x.stride(1), per_split, grid[1], **_rotation_constexprs(block),
               MODE=mode, SPLITS=triton.next_power_of_2(grid[1]), UPCAST_DOT=launch.interpret,
               BLOCK_M=bm, NT=nt, INT64=needs_int64(x, q),
               EVEN=aligned(M, bm) and aligned(K, nt * 256),
               options=compile_options(config.num_warps, overrides, launch.interpret))

    if granularity == "row" and grid[1] == 1:
        # One launch: each program owns whole lines, absmax then quantize (re-read from L2).
        scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
        run(ONE_LAUNCH, scale, scale)
        return q, scale
    amax = torch.empty((grid[1], M), dtype=torch.float32, device=x.device)
    run(ABSMAX, amax, amax)
    scale = _second_launch_scale(amax, granularity, FORMATS[fmt])
    run(QUANTIZE if granularity == "row" else QUANTIZE_WITH_SCALE, scale, amax)
    return q, scale


def _quantize_columns(launch, xv, q, fmt, granularity, block, dual):
    """dim 0, through the transposed view xv [features, tokens] of x: a scale per K index
    (token), and with `dual` the transpose qt [features, tokens] with a scale per line. An
    ABSMAX launch (a row of partials per split of the lines), then a QUANTIZE launch. Returns
    (q, scale), with `dual` (q, scale, qt, scale_t)."""
    M, K = xv.shape
    overrides = launch.overrides
    config = layout_config("dual" if dual else "outer", launch.interpret)
    bm = overrides.block_m or config.block_m
    want = wanted_programs(config.programs_per_sm, overrides, xv.device)
    grid, per_split = launch_grid(M, K, bm, 1, True, overrides.split, want)

    def run(mode, scale, amax, qt=q, scale_t=q, amax_t=q):
        launch(_hadamard_quantize_columns_kernel, grid, xv, q, scale, amax, qt, scale_t, amax_t,
               launch.seeds, M, K, xv.stride(0), xv.stride(1), per_split,
               **_rotation_constexprs(block), MODE=mode, DUAL=dual,
               SPLITS=triton.next_power_of_2(grid[1]), UPCAST_DOT=launch.interpret, BLOCK_M=bm,
               INT64=needs_int64(xv, q), EVEN=aligned(M, bm) and aligned(K, 256),
               options=compile_options(config.num_warps, overrides, launch.interpret))

    amax = torch.empty((grid[1], K), dtype=torch.float32, device=xv.device)
    if dual:  # the transpose, quantized per line of the view: its partials per K tile
        qt = torch.empty((M, K), dtype=q.dtype, device=xv.device)
        scale_t = torch.empty((M, 1), dtype=torch.float32, device=xv.device)
        amax_t = torch.empty((grid[0], M), dtype=torch.float32, device=xv.device)
        run(ABSMAX, amax, amax, qt, scale_t, amax_t)
        amax_t = amax_t.amax(0)  # once, not in every program that needs a line's scale
        scale = _second_launch_scale(amax, granularity, FORMATS[fmt])
        run(QUANTIZE, scale, amax, qt, scale_t, amax_t)
        return q, scale, qt, scale_t
    run(ABSMAX, amax, amax)
    scale = _second_launch_scale(amax, granularity, FORMATS[fmt])
    run(QUANTIZE if granularity == "row" else QUANTIZE_WITH_SCALE, scale, amax)
    return q, scale


def _quantize_transposed(launch, xv, q, fmt, granularity):
    """The unrotated quantization of a strided view xv [M, K] (a transpose: stride (1, M'))
    into q [M, K]: an ABSMAX launch (each program's absmax of each of its lines over its range
    of K, a row of partials per split), then a QUANTIZE launch of more, shorter programs.
    Returns (q, scale)."""
    M, K = xv.shape
    overrides = launch.overrides
    config = INTERPRETER_TRANSPOSE_CONFIG if launch.interpret else TRANSPOSE_CONFIG
    bm, bk = overrides.block_m or config.block_m, overrides.block_k or config.block_k
    tiles = overrides.tiles or config.tiles
    want = wanted_programs(config.programs_per_sm, overrides, xv.device)
    amax_grid, amax_per_split = launch_grid(M, K, bm, 1, False, overrides.split, want,
                                            k_tile=bk)
    line_blocks, n_split, k_tiles = amax_grid[0], amax_grid[1], triton.cdiv(K, bk)

    def run(mode, grid, per_split, scale, amax):
        launch(_transpose_quantize_kernel, grid, xv, q, scale, amax, launch.seeds, M, K,
               xv.stride(0), xv.stride(1), per_split, n_split, MODE=mode,
               SPLITS=triton.next_power_of_2(n_split), INT64=needs_int64(xv, q), BLOCK_M=bm,
               BLOCK_K=bk, EVEN=aligned(M, bm) and aligned(K, bk),
               options=compile_options(config.num_warps, overrides, launch.interpret))

    amax = torch.empty((n_split, M), dtype=torch.float32, device=xv.device)
    run(ABSMAX, amax_grid, amax_per_split, amax, amax)
    scale = _second_launch_scale(amax, granularity, FORMATS[fmt])
    run(QUANTIZE if granularity == "row" else QUANTIZE_WITH_SCALE,
        (line_blocks, triton.cdiv(k_tiles, tiles)), tiles * bk, scale, amax)
    return q, scale


def hadamard_quantize_triton(x, fmt="fp8_e4m3", granularity="row", block=0, dim=1,
                             rounding="nearest", **overrides):
    """Run the Triton kernels directly: on CUDA tensors compiled, on CPU tensors through the
    Triton interpreter. Returns (q [M, K] float8_e4m3fn / int8, contiguous; scale float32
    [M, 1] or [1, 1]): the rows of block_hadamard(x, block, dim) quantized per row (or tensor).

    dim=1 rotates along the rows ("inner"); any strides are read in place, so `t.t()` gives the
        quantized transpose of `t` with no transposing pass (grad-weight's dYᵀ and Xᵀ).
    dim=0 rotates along the columns ("outer": H along tokens), still one scale per row.
    rounding: "nearest", or "stochastic" (each value rounded up or down at random, unbiased, as
        quantize.py's reference does, with hashed numbers seeded from torch's generator).
    overrides: the fields of `LaunchOverrides` (block_m, nt, num_warps, split, num_stages,
        block_k, tiles, soft_fp8, recip_scale), instead of the layout's configuration."""
    interpret = x.device.type != "cuda"
    return _hadamard_quantize_impl(interpreted if interpret else _JITTED.get, x, fmt,
                                   granularity, block, dim, rounding, interpret=interpret,
                                   overrides=LaunchOverrides(**overrides))


def hadamard_quantize_dual_triton(x, fmt="fp8_e4m3", block=0, rounding="nearest", **overrides):
    """x [tokens, features] (grad-output dY) rotated along the tokens and quantized for both
    backward matmuls from one read per launch: (q, scale) as
    `hadamard_quantize_triton(x, fmt, "row", block, dim=0)` gives them (grad-input's dY,
    "outer": a scale per token), and (qt, scale_t) as
    `hadamard_quantize_triton(x.t(), fmt, "row", block)` gives them (grad-weight's dYᵀ
    [features, tokens], contiguous, "inner": a scale per feature). Each tile is loaded and
    rotated once per launch for both. `overrides`: as `hadamard_quantize_triton`'s."""
    interpret = x.device.type != "cuda"
    return _hadamard_quantize_impl(interpreted if interpret else _JITTED.get, x, fmt, "row",
                                   block, 0, rounding, dual=True, interpret=interpret,
                                   overrides=LaunchOverrides(**overrides))


def _wrapped(kernel_fn):
    """A kernel function launched from a triton_op (Inductor then emits the kernel itself)."""
    return wrap_triton(_JITTED[kernel_fn])


def hadamard_quantize_reference(x, fmt="fp8_e4m3", granularity="row", block=0, dim=1,
                                rounding="nearest"):
    """The plain-torch composition the kernel implements."""
    _check_args(x, fmt, granularity, block, dim, rounding=rounding)
    rotated = block_hadamard(x, block, dim=dim) if block else x.float()
    return quantize(rotated, fmt, granularity, rounding)


def hadamard_quantize_dual_reference(x, fmt="fp8_e4m3", block=0, rounding="nearest"):
    """The plain-torch composition the dual output implements."""
    _check_args(x, fmt, "row", block, 0, rounding=rounding)
    rotated = block_hadamard(x, block, dim=0) if block else x.float()
    return (*quantize(rotated, fmt, "row", rounding),
            *quantize(rotated.t().contiguous(), fmt, "row", rounding))


@triton_op("halo::hadamard_quantize", mutates_args=())
def hadamard_quantize(x: torch.Tensor, fmt: str, granularity: str, block: int,
                      dim: int = 1, rounding: str = "nearest"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-Hadamard rotation along `dim` (block 0: none) then quantization to `fmt`, one
    scale per row (or per tensor), rounding to nearest or stochastically. CUDA: the fused
    Triton kernels; other devices: the plain-torch reference."""
    if x.device.type != "cuda":
        return hadamard_quantize_reference(x, fmt, granularity, block, dim, rounding)
    return _hadamard_quantize_impl(_wrapped, x, fmt, granularity, block, dim,
                                   rounding=rounding)


@triton_op("halo::hadamard_quantize_dual", mutates_args=())
def hadamard_quantize_dual(x: torch.Tensor, fmt: str, block: int, rounding: str = "nearest"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dY rotated along the tokens, quantized for grad-input (a scale per token) and,
    transposed, for grad-weight (a scale per feature): see `hadamard_quantize_dual_triton`.
    CUDA: the fused Triton kernels; other devices: the plain-torch reference."""
    if x.device.type != "cuda":
        return hadamard_quantize_dual_reference(x, fmt, block, rounding)
    return _hadamard_quantize_impl(_wrapped, x, fmt, "row", block, 0, dual=True,
                                   rounding=rounding)
