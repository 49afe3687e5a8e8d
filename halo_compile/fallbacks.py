"""Never silently unquantized: telling the user when a linear halo was asked to quantize runs in
high precision anyway, and when a `layers` glob matches no linear.

Frames that run eagerly. Dynamo runs a frame without any compiled graph (so its linears run in
high precision, unquantized) when the frame hits `torch._dynamo.config.recompile_limit` (or
`accumulated_recompile_limit`), or when compiling it failed and `suppress_errors` turned the error
into eager execution. It says so in a `log.warning` of `torch._dynamo.convert_frame`, and nowhere
a backend could see. So:

* the backend stores in each graph's record (report.GraphRecord) the Dynamo frame it was compiled
  from (`current_frame()`: the compile id's `frame_id`, which Dynamo gives each code object, and
  the code's name, file and line);
* `install_log_filter()` puts one `logging.Filter` on that logger (once; it returns True for every
  record and changes none, so Dynamo's own messages are untouched). On a recompile-limit warning
  (logged inside the frame's compile context, whose compile id names the frame) or a suppressed
  error (the exception carries its compile id), it adds the reason to the records of that frame,
  and the report shows it on every linear of those records. It warns (`HaloFallbackWarning`)
  once per frame and reason, or, when a record's config has `on_fallback="error"`, raises
  `HaloFallbackError` from inside Dynamo's call, which propagates out of the compiled model's
  call.

Not done: forward pre-hooks on a known model's linears that flag calls made outside a compiled
graph. Measured, they flag deliberate eager calls (`model.forward(x)` for a reference, as the
Trainer tests make) as fallbacks, and saw nothing in the recompile-limit case that the log does
not say.

`layers` globs are judged against every linear of the model, not one graph (a model with graph
breaks compiles as several): against the module names of the model where it is known
(`configure`, `compile_in_place`), else at compile time against the module that owns the frame
(Dynamo's `self`) plus every graph compiled with an equal config, and at `report()` time against
the model. Each unmatched glob warns once (or raises under `on_fallback="error"`).

Limits. A frame is known by its code object: two live models of one class share their
`forward`'s frame, so a fallback of one is reported on the records of both (over-reporting,
never under). Dynamo's frame skips for graph breaks it cannot resume from are logged at INFO
level only, not seen (their callees are compiled as frames of their own, where the linears are
quantized). A warning that logging settings filter out before the logger's filters run
(`torch._logging.set_logs(dynamo=logging.ERROR)`) goes unseen, as do frames run eagerly by the
user's choice (`torch.compiler.set_stance("force_eager")`, `torch.compiler.disable`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from halo_compile.config import HaloConfig
from halo_compile.report import GraphRecord, graph_records

DYNAMO_LOGGER = "torch._dynamo.convert_frame"
_RECOMPILE_LIMIT_MESSAGE = "torch._dynamo hit config."


class HaloFallbackWarning(UserWarning):
    """A linear halo was asked to quantize ran in high precision, or a `layers` glob matched no
    linear."""


class HaloFallbackError(RuntimeError):
    """What HaloFallbackWarning warns of, under option on_fallback="error"."""


@dataclass(frozen=True)
class DynamoFrame:
    """A Dynamo frame: the `frame_id` Dynamo gave its code object, and that code."""

    frame_id: int
    name: str = ""
    filename: str = ""
    first_line: int = 0

    def __str__(self) -> str:
        where = f"{self.name} ({self.filename}:{self.first_line})" if self.name else "?"
        return f"frame {self.frame_id} {where}"

    def is_described_by(self, frame_id: int, text: str) -> bool:
        """Whether a Dynamo message about frame `frame_id` whose text is `text` is about this
        frame. Frame ids restart at `torch._dynamo.reset()`: the code's file and line must be
        in the text too, where known."""
        if frame_id != self.frame_id:
            return False
        return not self.name or (f"{self.filename}:{self.first_line}" in text
                                 or f"{self.filename} line {self.first_line}" in text)


_FRAMES_SEEN = {"counter": 0, "compile_ids": set()}


def current_frame() -> Optional[DynamoFrame]:
    """The Dynamo frame being compiled (from the backend), or None where this torch does not
    tell. Frame ids restart at `torch._dynamo.reset()`: when they do (Dynamo's frame counter
    went down, or a compile id comes again), the frames of every earlier record are forgotten,
    so that a fallback of a new frame is never put on an old model's record."""
    try:
        from torch._dynamo import convert_frame
        from torch._guards import CompileContext

        compile_id = CompileContext.current_compile_id()
    except Exception:  # a torch without it
        return None
    if compile_id is None or getattr(compile_id, "frame_id", None) is None:
        return None
    counter = getattr(convert_frame, "FRAME_COUNTER", 0)
    key = (compile_id.frame_id, getattr(compile_id, "frame_compile_id", None))
    if counter < _FRAMES_SEEN["counter"] or key in _FRAMES_SEEN["compile_ids"]:
        for record in graph_records():
            record.frame = None
        _FRAMES_SEEN["compile_ids"].clear()
    _FRAMES_SEEN["counter"] = counter
    _FRAMES_SEEN["compile_ids"].add(key)
    code = getattr(_current_tracer(), "f_code", None)
    if code is None:
        return DynamoFrame(compile_id.frame_id)
    return DynamoFrame(compile_id.frame_id, code.co_name, code.co_filename, code.co_firstlineno)


def frame_module() -> Optional[torch.nn.Module]:
    """The module whose method Dynamo is compiling (its `self`), or None."""
    module = getattr(_current_tracer(), "f_locals", {}).get("self")
    return module if isinstance(module, torch.nn.Module) else None


def _current_tracer():
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # not tracing, or a torch without it
        return None


# --------------------------------------------------------------------------------------------
# Frames Dynamo runs eagerly: the log filter
# --------------------------------------------------------------------------------------------

_WARNED: set = set()  # (frame, reason kind, its first record's id) already warned of


class _EagerFrameFilter(logging.Filter):
    """Sees Dynamo's warnings of frames it runs eagerly; passes every record on unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            event = _eager_frame_event(record)
        except Exception:  # never let halo's parsing break Dynamo's logging
            event = None
        if event is not None:
            frame_ran_eagerly(*event)  # may raise HaloFallbackError (on_fallback="error")
        return True


def install_log_filter() -> None:
    """Put the filter on Dynamo's logger, once."""
    logger = logging.getLogger(DYNAMO_LOGGER)
    if not any(isinstance(f, _EagerFrameFilter) for f in logger.filters):
        logger.addFilter(_EagerFrameFilter())


def _eager_frame_event(record: logging.LogRecord):
    """(frame id, the message's text, reason, reason kind, detail) when `record` says that Dynamo
    runs a frame eagerly, else None."""
    if record.levelno < logging.WARNING:
        return None
    message = record.msg if isinstance(record.msg, str) else ""
    if message.startswith(_RECOMPILE_LIMIT_MESSAGE) and len(record.args or ()) >= 4:
        from torch._guards import CompileContext

        compile_id = CompileContext.current_compile_id()
        if compile_id is None:
            return None
        limit_type, limit, function, last_reason = record.args[:4]
        reason = (f"Dynamo hit config.{limit_type} ({limit}): inputs its graphs do not cover "
                  "run eagerly")
        return (compile_id.frame_id, str(function), reason, limit_type,
                f" (last recompile reason: {last_reason})")
    error = record.exc_info[1] if record.exc_info else None
    compile_id = getattr(error, "compile_id", None)
    if error is not None and compile_id is not None:
        # A backend's error comes wrapped (BackendCompilerFailed): name the one it wraps.
        cause = getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [""])[0]
        reason = f"compile error suppressed (suppress_errors): {type(cause).__name__}"
        return (compile_id.frame_id, record.getMessage(), reason, type(cause).__name__,
                f" ({first_line[:300]})")
    return None


def frame_ran_eagerly(frame_id: int, text: str, reason: str, kind: str, detail: str = "") -> None:
    """Mark the records of the frame (Dynamo's frame `frame_id`, described by `text`) as run
    eagerly for `reason`; warn (with `detail`) once per frame and kind, or raise where a
    record's config says on_fallback="error"."""
    records = [r for r in graph_records()
               if r.frame is not None and r.frame.is_described_by(frame_id, text)
               and r.has_live_parameters()]
    if not records:
        return  # not a frame halo compiled
    for record in records:
        if reason not in record.fallbacks:
            record.fallbacks.append(reason)
    if not any(record.asks_quantization for record in records):
        return
    layers = sorted({r.name_in_messages(layer.fqn) for r in records for layer in r.layers
                     if layer.quantized})
    shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
    message = (f"halo: Dynamo ran {records[0].frame} eagerly: {reason}{detail}. Its linears that "
               f"halo quantizes ({shown or 'unknown: the compilation did not finish'}) ran in high "
               "precision, unquantized; halo_compile.report(model) marks them. "
               "Options {'on_fallback': 'error'} make this an error.")
    if any(r.config is not None and r.config.on_fallback == "error" for r in records):
        raise HaloFallbackError(message)
    key = (records[0].frame, kind, id(records[0]))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, HaloFallbackWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# `layers` globs that match no linear
# --------------------------------------------------------------------------------------------


def linear_names(module: torch.nn.Module) -> set:
    """The names halo may give the linears of `module`: each module owning a 2-D parameter, and
    each 2-D parameter's name without ".weight" (functional calls on a root parameter)."""
    names = {name for name, sub in module.named_modules()
             if any(p.dim() == 2 for p in sub.parameters(recurse=False))}
    names.update(name.removesuffix(".weight") for name, p in module.named_parameters()
                 if p.dim() == 2)
    return names


_GLOB_CHECKS: list = []  # [config, names seen in its graphs, globs warned of]


def _glob_check(config: HaloConfig) -> list:
    for entry in _GLOB_CHECKS:
        if entry[0] == config:
            return entry
    entry = [config, set(), set()]
    _GLOB_CHECKS.append(entry)
    return entry


def check_layer_globs(config: HaloConfig, names: Iterable[str], where: str) -> list[str]:
    """Warn (or raise, under on_fallback="error") for each `layers` glob of `config` that
    matches none of `names` together with the linears of every graph compiled with an equal
    config so far; once per glob. Returns the unmatched globs."""
    if not config.layers:
        return []
    entry = _glob_check(config)
    entry[1].update(names)
    unmatched = config.unmatched_layer_globs(entry[1])
    for glob in unmatched:
        message = (f"halo: layers[{glob!r}] matched no linear ({where}); the options it "
                   "sets apply nowhere. Names look like "
                   f"{sorted(entry[1])[:4]}.")
        if config.on_fallback == "error":
            raise ValueError(message)
        if glob not in entry[2]:
            entry[2].add(glob)
            warnings.warn(message, HaloFallbackWarning, stacklevel=3)
    return unmatched


def check_model_layer_globs(model: torch.nn.Module, config: HaloConfig) -> list[str]:
    """`check_layer_globs` against the linears of a model given to `configure` or
    `compile_in_place`."""
    return check_layer_globs(config, linear_names(model), "checked against the model's modules")


def check_graph_layer_globs(record: GraphRecord) -> list[str]:
    """At compile time: the globs of the record's config against the frame's module (when
    Dynamo compiles a module's method) and every graph compiled with an equal config. Without
    the frame's module the graphs seen so far may not be all of the model: judged at report()
    time instead."""
    config = record.config
    module = frame_module()
    names = {layer.fqn for layer in record.layers}
    if module is None:
        _glob_check(config)[1].update(names)
        return []
    return check_layer_globs(config, names | linear_names(module),
                             "checked against the compiled module's linears")


def check_layer_globs_of_records(model: torch.nn.Module, records: list) -> list[str]:
    """At report() time: the globs of each config the model was compiled with against the
    model's linears and its graphs'."""
    names = linear_names(model) | {layer.fqn for r in records for layer in r.layers}
    unmatched: list[str] = []
    for config in {id(r.config): r.config for r in records if r.config is not None}.values():
        for glob in check_layer_globs(config, names, "checked against the model at report()"):
            if glob not in unmatched:
                unmatched.append(glob)
    return unmatched


install_log_filter()
