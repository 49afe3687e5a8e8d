"""The launch decisions of the quantize kernels under symbolic token counts (dynamic shapes):
no guard on the count's value, so a compiled graph serves every count; the same grid as for
the count itself where the count is a plain int."""

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from halo_compile.kernels.hadamard_quantize_launch import aligned, launch_grid


def _symbolic(value: int):
    """A backed symbolic size whose value in the trace is `value`, and its shape environment."""
    env = ShapeEnv()
    return env.create_symintnode(env.create_symbol(value, ConstantSource("tokens")),
                                 hint=value), env


def _guards(env) -> list:
    return [str(guard.expr) for guard in env.guards]


@pytest.mark.parametrize("tokens", [300, 4096])
@pytest.mark.parametrize("layout", [
    # (M, K, block_m, nt, per_k, want): lines and K of the launches along the tokens
    ("rows of X", lambda t: (t, 4096, 1, 2, False, 0)),
    ("transposed dY", lambda t: (4096, t, 16, 1, False, 528)),
    ("dim 0 of dY", lambda t: (4096, t, 64, 1, True, 264)),
], ids=lambda p: p if isinstance(p, str) else "")
def test_launch_grid_takes_a_symbolic_count_without_a_guard(tokens, layout):
    _, shape = layout
    count, env = _symbolic(tokens)
    M, K, block_m, nt, per_k, want = shape(count)
    grid, per_split = launch_grid(M, K, block_m, nt, per_k, want=want)
    assert _guards(env) == []
    # Correct for every count: the splits cover the loop extent, and the grid's split is an int
    # (a constexpr of the kernel derives from it).
    assert isinstance(grid[1], int) and grid[1] >= 1
    loop_extent = M if per_k else K
    for value in (tokens, 17, 5000, 33333):
        covered, extent = (int(_at(size, count, value)) for size in (per_split, loop_extent))
        assert covered * grid[1] >= extent


def _at(size, symbol, value):
    """`size` (an int, or an expression of `symbol`) where `symbol` takes `value`."""
    if isinstance(size, int):
        return size
    return size.node.expr.subs(symbol.node.expr, value)


def test_launch_grid_of_static_counts_is_unchanged():
    """Plain ints take the exact split: never more programs than the loop has units."""
    grid, per_split = launch_grid(4096, 300, 16, 1, False, want=528)
    assert grid == (256, 2) and per_split == 256
    grid, per_split = launch_grid(4096, 8192, 64, 1, True, want=264)
    assert grid == (32, 8) and per_split == 512


def test_aligned_is_decided_without_a_guard():
    count, env = _symbolic(300)
    assert not aligned(count, 16)  # not provable: masked loads, never a guard
    assert aligned(256 * ((count + 255) // 256), 256)  # a count padded to the token block
    assert aligned(4096, 256) and not aligned(300, 256)
    assert _guards(env) == []


class _RecordingLaunches:
    """In place of the compiled kernels: records each launch's kernel, grid and arguments."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel_fn):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel_fn.__name__, grid, args, kwargs))
                return launch
        return Launcher()


class _Device:
    multi_processor_count = 132


@pytest.mark.parametrize("case", ["rows", "transposed", "transposed rotated", "dim 0", "dual"])
def test_cuda_launches_of_a_symbolic_token_count_add_no_guard(monkeypatch, case):
    """The CUDA path of halo::hadamard_quantize, as Inductor traces it under dynamic shapes
    (fake CUDA tensors, the token count symbolic), with the kernels recorded instead of run:
    every launch is decided without a guard on the count's value (only, for 32-bit offsets, on
    its range), and each kernel's constexprs are plain values (the grid's split among them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import halo_compile.kernels.triton_hadamard_quantize as kernels

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Device())
    count, env = _symbolic(300)
    recorder = _RecordingLaunches()
    with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True):
        tokens = 256 * ((count + 255) // 256)  # as pad_rows pads them for the rotations
        dy = torch.empty((count, 4096), dtype=torch.bfloat16, device="cuda")
        padded = torch.empty((tokens, 4096), dtype=torch.bfloat16, device="cuda")
        x, dim, block, dual = {
            "rows": (dy, 1, 256, False),  # the forward's X, rotated along its features
            "transposed": (dy.t(), 1, 0, False),  # halo2's grad-weight dYᵀ, not rotated
            "transposed rotated": (padded.t(), 1, 256, False),  # grad-weight "inner"
            "dim 0": (padded, 0, 256, False),  # grad-input "outer"
            "dual": (padded, 0, 256, True),  # both from one kernel
        }[case]
        kernels._hadamard_quantize_impl(recorder, x, "fp8_e4m3", "row", block, dim, dual=dual)
    # At most a bound on the count's range (its offsets fit 32 bits), nothing on its value.
    assert all(guard.endswith("< 2147483648") and not any(
        word in guard for word in ("Eq", "Ne", "Mod")) for guard in _guards(env)), _guards(env)
    assert recorder.launches
    for name, _, _, constexprs in recorder.launches:  # (a grid may be symbolic)
        for key, value in constexprs.items():
            assert not isinstance(value, torch.SymInt | torch.SymBool), (name, key, value)
