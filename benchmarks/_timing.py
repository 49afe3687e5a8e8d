"""Timing and reporting helpers shared by the benchmark scripts (run as `python benchmarks/x.py`,
so this module is importable as `_timing`)."""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import tempfile
import time

import torch
from torch.autograd import DeviceType


def _call_times(step, reps: int) -> list:
    """Milliseconds of each of `reps` calls of `step()`, each timed with CUDA events and
    synchronized, so host-side launch overhead between calls is not hidden by queued work, but
    host time inside a call (launches, syncs) is counted."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _queued_ms(step, reps: int) -> float:
    """Milliseconds per call of `reps` calls queued back to back, one synchronization at the end:
    host work then overlaps the previous call's GPU work, as in a training loop that does not
    wait for each step, so this is the GPU's throughput unless the host is the slower."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _median(values) -> float:
    return sorted(values)[len(values) // 2]


def median_ms(step, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of `step()` over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return _median(_call_times(step, reps))


def interleaved_median_ms(steps: dict, rounds: int, reps: int, warmup: int = 3,
                          queued: bool = False) -> dict:
    """Median milliseconds of each of `steps` (name -> callable), timed in `rounds` rounds that
    take the contenders in turn, `reps` calls each per round: a drift of the GPU's clocks or
    temperature during the run then weighs on every contender alike instead of on whichever ran
    last (back-to-back timings of one contender varied by up to 35% between device runs).
    Each call synchronized (`_call_times`), or with `queued` the mean of each round's calls
    queued back to back (`_queued_ms`)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if queued:
                times[name].append(_queued_ms(step, reps))
            else:
                times[name] += _call_times(step, reps)
    return {name: _median(t) for name, t in times.items()}


def host_ms(steps: dict, rounds: int, reps: int) -> dict:
    """Median milliseconds of host time to issue one call of each of `steps`: `reps` calls queued
    back to back, timed on the host before the synchronization. Where it is near the queued
    time, the host, not the GPU, sets the pace; unless the step itself synchronizes (a
    transformers Llama does once a step: docs/BENCHMARKS.md), whose wait is then counted too."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - start) * 1e3 / reps)
            torch.cuda.synchronize()
    return {name: _median(t) for name, t in times.items()}


def speedup(times: dict, name: str) -> str:
    """`name`'s speed-up over bf16 Inductor in `times` (name -> ms)."""
    bf16 = times.get("bf16 inductor")
    return f"{bf16 / times[name]:.2f}x" if bf16 else "-"


def time_fwd_bwd(fn, x, grad, reps: int) -> float:
    """Median milliseconds of `fn(x).backward(grad)`."""
    return median_ms(lambda: fn(x).backward(grad), reps)


def peak_gib(step) -> float:
    """Peak GPU memory (GiB) allocated while running `step()` once, from a synchronized start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _on_device(events):
    """A profile's device activities (kernels, copies, memsets), without the ranges that
    annotate them on the device's timeline (`Optimizer.step#AdamW.step` spans its kernels)."""
    return [e for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def gpu_timeline(events, reps: int) -> str:
    """What the GPU did over `reps` calls, from a profile's events (`prof.events()`): device
    activities (kernels, copies, memsets) per call, the time at least one ran (busy), and the
    span from the first start to the last end; span - busy is the time the GPU sat idle between
    them (launch latency, host waits, and the host's time between the profiled calls, which
    the profiler itself lengthens)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in _on_device(events))
    if not spans:
        return "GPU timeline: no device activity in the profile"
    busy, run_start, run_end = 0.0, spans[0][0], spans[0][1]
    for start, end in spans[1:]:
        if start > run_end:  # a gap: close the busy run
            busy += run_end - run_start
            run_start = start
        run_end = max(run_end, end)
    busy += run_end - run_start
    span = max(end for _, end in spans) - spans[0][0]
    return (f"GPU timeline ({reps} calls): {len(spans) / reps:.0f} device activities a call; "
            f"busy {busy / reps / 1e3:.3f} ms of a {span / reps / 1e3:.3f} ms span a call "
            f"(idle {(span - busy) / reps / 1e3:.3f} ms)")


def _warm(step) -> None:
    """Calls enough to be past one-off costs before a profile: lazy module loading, the first
    batched inf/NaN check."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()


def queued_gaps(step, reps: int, top: int = 8) -> str:
    """The GPU's idle time over `reps` calls of `step()` queued back to back, profiled with
    device activity only: the host then keeps ahead (see `host_ms`), so what is left idle
    between two activities is the GPU's own (launch latency, dependencies), not the host's. The
    largest idle times a call, by the activity that follows them."""
    from torch.profiler import ProfilerActivity, profile

    _warm(step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    activities = sorted((e.time_range.start, e.time_range.end, e.name)
                        for e in _on_device(prof.events()))
    if not activities:
        return "queued GPU timeline: no device activity in the profile"
    idle_before, run_end = {}, activities[0][1]
    for start, end, name in activities[1:]:
        if start > run_end:
            idle_before[name] = idle_before.get(name, 0.0) + start - run_end
        run_end = max(run_end, end)
    span = run_end - activities[0][0]
    idle = sum(idle_before.values())
    lines = [f"queued GPU timeline ({reps} calls): {span / reps / 1e3:.3f} ms a call, of which "
             f"idle {idle / reps / 1e3:.3f} ms; idle a call before:"]
    for name, us in sorted(idle_before.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {us / reps:8.1f} us  {name[:90]}")
    return "\n".join(lines)


def device_activities(events, reps: int, top: int) -> str:
    """The device activities (kernels, copies, memsets) of a profile by their GPU time a call.
    Only the device's own events: torch.profiler's table also lists the host-side ranges
    Inductor names after the kernels it launches (`<kernel>_<n>`), each repeating its kernel's
    time."""
    totals: dict = {}
    for e in _on_device(events):
        us, count = totals.get(e.name, (0.0, 0))
        totals[e.name] = (us + e.time_range.end - e.time_range.start, count + 1)
    total = sum(us for us, _ in totals.values())  # overlapping activities count each
    lines = [f"device activities by GPU time ({reps} calls; {total / reps / 1e3:.3f} ms a call "
             f"in all):", f"{'us a call':>10} {'share':>6} {'a call':>6}  name"]
    for name, (us, count) in sorted(totals.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{us / reps:10.1f} {100 * us / total:5.1f}% {count / reps:6.1f}  {name[:90]}")
    return "\n".join(lines)


def launches_by_grid(trace_events, reps: int, match: str = "quantize_kernel") -> str:
    """The GPU kernels whose name contains `match` (halo's quantize kernels), grouped by name,
    grid and block: launches and microseconds a call, from a profiler's Chrome-trace events.
    Tells apart launches that one name lumps together (an absmax launch from its quantize
    launch, one operand's shape from another's)."""
    groups = collections.defaultdict(lambda: [0, 0.0])
    for event in trace_events:
        if event.get("cat") == "kernel" and match in event.get("name", ""):
            args = event.get("args", {})
            key = (event["name"], tuple(args.get("grid", ())), tuple(args.get("block", ())))
            groups[key][0] += 1
            groups[key][1] += event.get("dur", 0.0)
    lines = [f"kernels named *{match}* by grid ({reps} calls):",
             " us a call  launches a call  grid  block  name"]
    for (name, grid, block), (count, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{us / reps:10.1f}  {count / reps:15.1f}  {grid}  {block}  {name}")
    return "\n".join(lines)


def _trace_events(prof) -> list:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def kernel_breakdown(step, reps: int, top: int = 15) -> str:
    """torch.profiler tables of `reps` calls of `step()`: the GPU's timeline (`gpu_timeline`), the
    device activities by GPU time (`device_activities`), halo's quantize launches by grid
    (`launches_by_grid`), then the host-side ops by their own CPU time (where a step's time goes
    when the GPU waits)."""
    from torch.profiler import ProfilerActivity, profile

    _warm(step)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return "\n".join([
        gpu_timeline(prof.events(), reps),
        device_activities(prof.events(), reps, top),
        launches_by_grid(_trace_events(prof), reps),
        f"host (self CPU time, {reps} calls):",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                  max_name_column_width=70),
    ])


def python_profile(step, reps: int, top: int = 30) -> str:
    """cProfile of `reps` calls of `step()` queued back to back: the Python functions that the
    host's time per call goes to, by their own time."""
    import cProfile
    import io
    import pstats

    _warm(step)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def environment() -> str:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"device {device}, torch {torch.__version__}, triton "
            f"{triton.__version__}, python {platform.python_version()}, "
            f"{datetime.date.today()}")


def markdown_table(title: str, headers, rows) -> str:
    lines = [title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines + ["", environment()])


def emit(table: str, markdown_path) -> None:
    """Print the table and append it to `markdown_path` (if given)."""
    print(table, flush=True)
    if markdown_path:
        with open(markdown_path, "a") as f:
            f.write(table + "\n\n")
