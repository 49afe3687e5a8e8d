"""Quantization to FP8 E4M3 and INT8 with per-tensor or per-row scales: the plain-torch reference.

`quantize` returns the low-precision values themselves (torch.float8_e4m3fn / torch.int8 tensors)
and the float32 scales, so `q.float() * scale` is the dequantized tensor. The rounding is the real
rounding of the format, which makes CPU results match what the GPU's GEMM consumes.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .constants import FORMATS, MIN_AMAX

# The tags of ops that do host-side work on every call (queueing deferred inf/NaN checks, reading
# the weight cache): a CUDA graph replay would skip that work, so Inductor must run them outside
# its graphs (HaloConfig.cudagraphs). Empty on a torch without the tag.
HOST_SIDE_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)

_E4M3_DROPPED_MANTISSA_BITS = 23 - 3  # float32 mantissa bits that E4M3 does not keep


class NonFiniteInputError(ValueError):
    """A quantized matmul was given inf or NaN: the result would silently be garbage."""


def absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Float32 absmax per row ([M, 1]) or for the whole tensor ([1, 1]) of a 2-D tensor."""
    a = x.abs().float()
    if granularity == "row":
        return a.amax(dim=-1, keepdim=True)
    return a.amax().reshape(1, 1)


def check_finite(amax: torch.Tensor, where: str) -> None:
    """Raise NonFiniteInputError if an absmax (or a scale) is inf/NaN: any inf/NaN in a tensor
    reaches its absmax. See `check_operands_finite` for when it raises on CUDA."""
    check_all_finite([(where, amax)])


def operand_name(where: str, side: str) -> str:
    """How a check names a matmul's operand: `where` (the matmul) and `side` ("left" / "right")."""
    return f"{where} ({side} operand)"


def check_operands_finite(amax_a: torch.Tensor, amax_b: torch.Tensor, where: str) -> None:
    """`check_finite` for both operands of a matmul at once.

    On the CPU it raises at once. On CUDA a host sync per matmul would stall the launch queue
    (measured: a third of an FP8 linear's time), so the check is deferred (_DeferredChecks): the
    tensors of several checks are reduced together, their max copied to pinned memory behind an
    event and read by a later check once the event has completed, or by
    `raise_pending_nonfinite()`. The error names the matmul and operand where it happened."""
    check_all_finite([(operand_name(where, "left"), amax_a),
                      (operand_name(where, "right"), amax_b)])


def raise_pending_nonfinite() -> None:
    """Wait for every deferred CUDA inf/NaN check and raise NonFiniteInputError if one failed.
    Call it where a step must be known clean (before `optimizer.step()`, at a checkpoint)."""
    _DEFERRED_CHECKS.poll(wait=True)


def check_all_finite(named: "list[tuple[str, torch.Tensor]]", copy: bool = False) -> None:
    """`check_finite` for several tensors at once: (what each belongs to, tensor) pairs, in the
    order an error should consider them (names may repeat: a layer called twice). `copy`: see
    `_DeferredChecks.submit`."""
    if named[0][1].device.type == "cuda":
        _DEFERRED_CHECKS.submit(named, copy)
        return
    for where, amax in named:
        if not bool(torch.isfinite(amax).all()):
            raise _nonfinite_error(where)


def _nonfinite_error(where: str) -> NonFiniteInputError:
    return NonFiniteInputError(
        f"halo: inf/NaN in {where}; quantizing it would give meaningless values. "
        "Fix the input or pass options={'nonfinite': 'propagate'} to let it flow through "
        "(e.g. for GradScaler-based fp16 training)."
    )


class _DeferredChecks:
    """The CUDA verdicts, deferred twice so that a check costs the host almost nothing:

    * `submit` only collects the named tensors (absmax or scale values, >= 0, so inf/NaN exactly
      when their operand held one). Holding them keeps their memory from being reused.
    * Every `flush_every` submissions (and when a verdict is waited for), `flush` concatenates
      what was collected, copies its max to pinned memory behind an event and queues that
      verdict: three launches for many matmuls' operands. (A compiled graph submits all its
      scales at once: passes/batch_nonfinite_checks.py.)
    * `poll` reads the verdicts whose event has completed, oldest first. A non-finite max is
      traced to the first of its tensors that holds an inf/NaN, which names it.

    `make_event` and `pin_memory` are what tests replace to run it on CPU tensors."""

    def __init__(self, flush_every: int = 8, make_event=None, pin_memory: bool = True):
        self.flush_every = flush_every
        self._make_event = make_event or torch.cuda.Event
        self._pin_memory = pin_memory
        self._collected: list = []  # (name, tensor), in submission order
        self._submissions = 0
        self._pending: deque = deque()  # ((name, tensor) pairs, pinned max, event)

    def submit(self, named: "list[tuple[str, torch.Tensor]]", copy: bool = False) -> None:
        """`copy`: the tensors' memory is reused before the verdict is read (outputs of a CUDA
        graph, overwritten by its next replay): keep one concatenated copy of them instead."""
        if self._collected and self._collected[0][1].device != named[0][1].device:
            self.flush()  # one buffer per device
        if copy:  # [n, 1] parts of one column: flush concatenates them as they are
            parts = torch.cat([_column(t) for _, t in named]).split([t.numel() for _, t in named])
            named = [(name, part) for (name, _), part in zip(named, parts, strict=False)]
        self._collected.extend(named)
        self._submissions += 1
        if self._submissions >= self.flush_every:
            self.flush()
        self.poll(wait=False)

    def flush(self) -> None:
        if not self._collected:
            return
        peak = torch.empty((1,), dtype=torch.float32, pin_memory=self._pin_memory)
        peak.copy_(torch.cat([_column(t) for _, t in self._collected]).amax().reshape(1),
                   non_blocking=True)
        event = self._make_event()
        event.record()
        self._pending.append((self._collected, peak, event))
        self._collected, self._submissions = [], 0

    def poll(self, wait: bool) -> None:
        if wait:
            self.flush()
        while self._pending:
            named, peak, event = self._pending[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._pending.popleft()
            if not math.isfinite(peak.item()):
                self._pending.clear()  # later verdicts follow from this one
                # The rare path: find the first tensor that holds it.
                raise _nonfinite_error(next(name for name, t in named
                                            if not bool(torch.isfinite(t).all())))


def _column(t: torch.Tensor) -> torch.Tensor:
    """`t` as an [n, 1] column. Host time is what the deferred checks save, so no op where none
    is needed: absmax and scale tensors are [n, 1] (one per row) already."""
    return t if t.dim() == 2 and t.shape[1] == 1 else t.reshape(-1, 1)


_DEFERRED_CHECKS = _DeferredChecks()


def quantize(
    x: torch.Tensor, fmt: str, granularity: str, rounding: str = "nearest", amax=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor. Returns (values in the format's dtype, float32 scales)."""
    spec = FORMATS[fmt]
    if amax is None:
        amax = absmax(x, granularity)
    scale = amax.clamp_min(MIN_AMAX) / spec.max_value
    scaled = x.float() / scale
    if spec.dtype == torch.int8:
        if rounding == "stochastic":
            scaled = torch.floor(scaled + torch.rand_like(scaled))
        else:
            scaled = torch.round(scaled)
        q = scaled.clamp(-spec.max_value, spec.max_value).to(torch.int8)
    else:
        if rounding == "stochastic":
            scaled = _stochastic_round_to_e4m3_mantissa(scaled)
        q = scaled.clamp(-spec.max_value, spec.max_value).to(spec.dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def _stochastic_round_to_e4m3_mantissa(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to 3 mantissa bits, up or down with probability proportional to the
    distance (unbiased). Adding uniform noise below the kept bits and truncating does that in
    sign-magnitude float encoding. Values in E4M3's subnormal range (|x| < 2^-6 after scaling)
    are then rounded to nearest by the cast; they carry a negligible share of the tensor."""
    bits = x.view(torch.int32)
    noise = torch.randint(
        0, 1 << _E4M3_DROPPED_MANTISSA_BITS, x.shape, dtype=torch.int32, device=x.device
    )
    keep_mask = -(1 << _E4M3_DROPPED_MANTISSA_BITS)  # ...111100..0 in two's complement
    return ((bits + noise) & keep_mask).view(torch.float32)
