"""How the quantize kernels are launched: the launch configuration of each layout (measured;
docs/design.md, "The quantize kernels"), the overrides a caller may give, and the grid.

A layout's configuration is data: the Python side looks it up, the kernels take it as
constexprs. Layouts of the rotating kernels (triton_rows_quantize.py,
triton_columns_quantize.py): "rows" (K contiguous), "rows, not rotated", "transposed" (a
strided view, rotated), "outer" (dim 0), "dual" (dim 0 and the transpose). A strided view
without rotation takes triton_transpose_quantize.py and TRANSPOSE_CONFIG.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import triton


class LaunchConfig(NamedTuple):
    """A rotating kernel's launch: lines per program and 256-wide tiles per line and loop
    iteration (a batch of block_m * nt tiles of [16, 16]), warps, and the programs per SM that
    splitting the loop aims for when a launch has too few programs (0: no split)."""

    block_m: int
    nt: int
    num_warps: Optional[int]
    programs_per_sm: int


class TransposeConfig(NamedTuple):
    """The unrotated transpose kernel's launch: a tile of block_m lines x block_k K indices,
    warps, the programs per SM the ABSMAX launch aims for, and K tiles per program of the
    QUANTIZE launch."""

    block_m: int
    block_k: int
    num_warps: Optional[int]
    programs_per_sm: int
    tiles: int


GPU_CONFIGS = {
    # One warp per 16 x 16 tile and few tiles per program, many programs per SM.
    "rows": LaunchConfig(1, 2, 2, 0),
    "rows, not rotated": LaunchConfig(1, 4, 4, 0),
    # BLOCK_M lines side by side make each load 2 * BLOCK_M contiguous bytes (bf16) per K index.
    "transposed": LaunchConfig(16, 1, 4, 4),
    # A program per 256 K indices looping over a split of the lines; up to 2 programs per SM,
    # the most that fit at once (one wave).
    "outer": LaunchConfig(64, 1, 4, 2),
    "dual": LaunchConfig(32, 1, 4, 2),
}
TRANSPOSE_CONFIG = TransposeConfig(64, 128, 4, 4, 4)
# The interpreter takes bigger batches (fewer numpy calls) and uses both BLOCK_M > 1 and NT > 1
# so that the tests cover both kinds of masking.
INTERPRETER_CONFIG = LaunchConfig(32, 2, None, 0)
INTERPRETER_STRIDED_CONFIG = LaunchConfig(8, 1, None, 0)
INTERPRETER_TRANSPOSE_CONFIG = TransposeConfig(8, 16, None, 0, 2)


@dataclasses.dataclass(frozen=True)
class LaunchOverrides:
    """What a caller (a test, a benchmark sweep) may set instead of the layout's configuration;
    None: the configuration's (or the device's) own.

    block_m / nt / num_warps: as in LaunchConfig; for the transpose kernel block_m and block_k
        (TransposeConfig), and tiles, the K tiles of a QUANTIZE program.
    split: programs the loop is divided over (K for per-row scales, which then need a second
        launch; the lines for dim 0); for the transpose kernel, the ABSMAX launch's K ranges.
    num_stages: Triton's software pipelining depth (tiles in flight in shared memory).
    soft_fp8: compute the E4M3 bits with integer operations (default: only in the interpreter,
        whose float8 cast rounds wrongly).
    recip_scale: compute the scale as amax * float32(1 / max), as torch does on CUDA (default
        there), rather than amax / max (default on the CPU)."""

    block_m: Optional[int] = None
    nt: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    split: Optional[int] = None
    block_k: Optional[int] = None
    tiles: Optional[int] = None
    soft_fp8: Optional[bool] = None
    recip_scale: Optional[bool] = None


def layout_config(layout: str, interpret: bool) -> LaunchConfig:
    """The configuration of a rotating kernel's layout (GPU_CONFIGS), or the interpreter's."""
    if interpret:
        return INTERPRETER_CONFIG if layout.startswith("rows") else INTERPRETER_STRIDED_CONFIG
    return GPU_CONFIGS[layout]


def compile_options(num_warps, overrides: LaunchOverrides, interpret: bool) -> dict:
    """Triton's launch options: the warps, and num_stages only when given (else Triton's
    default software pipelining); none under the interpreter."""
    if interpret:
        return {}
    options = {"num_warps": overrides.num_warps or num_warps}
    if overrides.num_stages:
        options["num_stages"] = overrides.num_stages
    return options


def wanted_programs(programs_per_sm: int, overrides: LaunchOverrides, device) -> int:
    """How many programs splitting a launch's loop aims for (0: no split): programs_per_sm on
    every SM, unless the split is given."""
    if not programs_per_sm or overrides.split is not None:
        return 0
    return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def launch_grid(M, K, block_m, nt, per_k, split=None, want=0, k_tile=256):
    """(grid, per_split) of a launch over M lines of K values: programs (a, s), a along the
    lines (blocks of block_m) with the loop along K (tiles of nt * k_tile), or with per-K scales
    (per_k) a along K (tiles of k_tile) with the loop along the lines; s splits the loop, into
    `split` parts, or when there are fewer than want / 2 programs into as many as keep the
    launch at no more than `want` programs (at 2 per SM, a 289th program on 132 SMs is a second
    wave: 40% slower). per_split: the loop extent (K indices, or lines) of one split."""
    line_blocks = triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, nt * k_tile)
    programs, loop_units, unit = ((k_tiles, line_blocks, block_m) if per_k
                                  else (line_blocks, k_tiles, nt * k_tile))
    if split is None:
        # Too few programs: a transposed [out, T] view has only out / BLOCK_M, dim 0 T / 256.
        # (A symbolic token count: chosen for the count traced, a choice of speed only.)
        programs_now = size_hint(programs)
        split = want // programs_now if programs_now < want // 2 else 1
    if not isinstance(loop_units, int):
        # A symbolic extent: `split` programs, any trailing ones with nothing to do, so that
        # the grid's split (a constexpr of the kernel) does not depend on the token count.
        return (programs, max(1, split)), triton.cdiv(loop_units, max(1, split)) * unit
    split = max(1, min(split, loop_units))
    per_split = triton.cdiv(loop_units, split) * unit
    return (programs, triton.cdiv(loop_units, per_split // unit)), per_split


def size_hint(size) -> int:
    """`size` as an int: itself, or for a symbolic size the value it has in the trace (read
    without a guard: only for choices of speed, never of results)."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)  # (SymNode.hint: in torch 2.11 and 2.13)
    return int(hint) if hint is not None else _UNKNOWN_COUNT


# The count a choice of speed assumes for a size with no value in the trace (an unbacked one).
_UNKNOWN_COUNT = 8192


def aligned(size, multiple: int) -> bool:
    """Whether `size` is a multiple of `multiple` for every value it can take (a symbolic size
    that is not provably one counts as unaligned: masked, never a guard on its value)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(size % multiple == 0)


def needs_int64(xv: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether a kernel's element offsets into the view xv [M, K] or into q exceed int32."""
    M, K = xv.shape
    extent = torch.sym_max((M - 1) * xv.stride(0) + (K - 1) * xv.stride(1), q.numel()) + 1
    # A symbolic extent (the token count): a guard on its range, not its value. A graph serves
    # every count below 2^31 elements a tensor; a larger one compiles again, with 64-bit offsets.
    return bool(extent >= 2**31)
