"""halo_compile/fallbacks.py: frames Dynamo runs eagerly are reported, warned of once or raised;
`layers` globs that match no linear warn or raise."""

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halo_compile
from halo_compile import HaloFallbackError, HaloFallbackWarning, fallbacks
from halo_compile.integrations import compile_in_place

FAST = {"compiler": "aot_eager", "min_features": 16}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def halo_warnings(caught):
    return [w for w in caught if issubclass(w.category, HaloFallbackWarning)]


def run_past_recompile_limit(compiled, batches=(2, 3, 4)):
    """One graph for the first batch size; the later ones exceed recompile_limit=1."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for batch in batches:
            compiled(torch.randn(batch, 8, 64))


def test_recompile_limit_is_reported_with_one_warning():
    torch.manual_seed(0)
    compiled = torch.compile(MLP(), backend="halo", options=FAST, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_past_recompile_limit(compiled)
    found = halo_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert message.startswith("halo:") and "recompile_limit" in message
    assert "'forward'" not in message and "forward (" in message  # names the frame
    assert "up" in message and "down" in message
    report = halo_compile.report(compiled)
    for name in ("up", "down"):
        layer = report[name]
        assert layer.quantized  # its graph quantizes it ...
        assert "recompile_limit" in layer.fallback  # ... and it also ran eagerly
    assert {layer.fqn for layer in report.fell_back} == {"up", "down"}
    text = str(report)
    assert "RAN EAGERLY" in text and "recompile_limit" in text


def test_recompile_limit_runs_unquantized_so_the_report_is_right():
    """What the report says is what happened: past the limit the output is exactly eager's
    (unquantized), within the limit it is FP8's (off by more than float rounding)."""
    torch.manual_seed(1)
    model = MLP()
    compiled = torch.compile(model, backend="halo", options=FAST, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HaloFallbackWarning)
        with torch._dynamo.config.patch(recompile_limit=1):
            x_first, x_later = torch.randn(2, 8, 64), torch.randn(3, 8, 64)
            first, later = compiled(x_first), compiled(x_later)
    with torch.no_grad():
        assert (first - model(x_first)).abs().max() > 1e-3
        assert (later - model(x_later)).abs().max() < 1e-6


def test_recompile_limit_raises_under_on_fallback_error():
    torch.manual_seed(2)
    compiled = torch.compile(MLP(), backend="halo", options={**FAST, "on_fallback": "error"},
                             dynamic=False)
    with pytest.raises(HaloFallbackError) as info:
        run_past_recompile_limit(compiled)
    message = str(info.value)
    assert message.startswith("halo:") and "recompile_limit" in message and "forward (" in message


def test_suppressed_compile_error_is_reported(monkeypatch):
    """A compile error that suppress_errors turns into eager execution: the frame's layers are
    marked with the error, and one warning names it."""
    torch.manual_seed(3)
    calls = []

    def failing_second_compile(gm, example_inputs):
        calls.append(gm)
        if len(calls) == 2:
            raise RuntimeError("injected compile failure")
        return gm.forward

    from torch._dynamo.backends import registry

    real_lookup = registry.lookup_backend
    monkeypatch.setattr(registry, "lookup_backend",
                        lambda name: failing_second_compile if name == "aot_eager"
                        else real_lookup(name))
    model = MLP()
    compiled = torch.compile(model, backend="halo", options=FAST, dynamic=False)
    with warnings.catch_warnings(record=True) as caught, \
            torch._dynamo.config.patch(suppress_errors=True):
        warnings.simplefilter("always")
        compiled(torch.randn(2, 8, 64))
        compiled(torch.randn(3, 8, 64))  # recompiles: the injected failure
    found = halo_warnings(caught)
    assert len(found) == 1 and "injected compile failure" in str(found[0].message)
    report = halo_compile.report(model)
    for name in ("up", "down"):
        assert report[name].quantized
        assert report[name].fallback == "compile error suppressed (suppress_errors): RuntimeError"


def test_filter_leaves_dynamo_messages_alone(caplog):
    torch.manual_seed(4)
    compiled = torch.compile(MLP(), backend="halo", options=FAST, dynamic=False)
    fallbacks.install_log_filter()  # idempotent
    logger = logging.getLogger(fallbacks.DYNAMO_LOGGER)
    assert sum(isinstance(f, fallbacks._EagerFrameFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=fallbacks.DYNAMO_LOGGER), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", HaloFallbackWarning)
        run_past_recompile_limit(compiled)
    dynamo = [r for r in caplog.records if r.name == fallbacks.DYNAMO_LOGGER]
    assert any("torch._dynamo hit config.recompile_limit" in r.getMessage() for r in dynamo)


def test_no_warning_without_fallback():
    torch.manual_seed(5)
    compiled = torch.compile(MLP(), backend="halo", options=FAST, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compiled(torch.randn(2, 8, 64))
    assert not halo_warnings(caught)
    assert not halo_compile.report(compiled).fell_back


def test_recompile_limit_of_a_model_compiled_in_place_is_reported():
    torch.manual_seed(9)
    model = compile_in_place(MLP(), FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
            for batch in (2, 3, 4):
                model(torch.randn(batch, 8, 64))
    assert len(halo_warnings(caught)) == 1
    assert "recompile_limit" in halo_compile.report(model)["up"].fallback


# --------------------------------------------------------------------------------------------
# `layers` globs that match no linear
# --------------------------------------------------------------------------------------------


def test_glob_matching_nothing_warns_at_compile():
    torch.manual_seed(10)
    compiled = torch.compile(MLP(), backend="halo",
                             options={**FAST, "layers": {"*.down_prj": None, "down": None}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 8, 64))
        report = halo_compile.report(compiled)
    found = halo_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "'*.down_prj'" in str(found[0].message) and "matched no linear" in str(found[0].message)
    assert report.unmatched_globs == ["*.down_prj"]
    assert "'*.down_prj'] matches no linear" in str(report)
    assert not report["down"].quantized  # the glob that matches still applies


def test_glob_judged_against_every_graph_of_a_model_with_a_graph_break():
    """`later` is only in the graph after the break: a glob naming it is not unmatched."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(64, 64)
            self.later = nn.Linear(64, 64)

        def forward(self, x):
            x = self.first(x)
            torch._dynamo.graph_break()
            return self.later(x)

    torch.manual_seed(11)
    compiled = torch.compile(Broken(), backend="halo",
                             options={**FAST, "layers": {"later": {"format": "int8"}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 8, 64))
        report = halo_compile.report(compiled)
    assert not halo_warnings(caught)
    assert report["later"].format == "int8" and report["first"].format == "fp8_e4m3"


def test_glob_matching_nothing_raises_under_on_fallback_error():
    with pytest.raises(ValueError, match=r"layers\['\*\.down_prj'\] matched no linear"):
        halo_compile.configure(MLP(), {"layers": {"*.down_prj": None}, "on_fallback": "error"})
    with pytest.raises(ValueError, match=r"'\*\.down_prj'"):
        compile_in_place(MLP(), {"layers": {"*.down_prj": None}, "on_fallback": "error"})
    compiled = torch.compile(MLP(), backend="halo", options={
        **FAST, "layers": {"*.down_prj": None}, "on_fallback": "error"})
    with pytest.raises(Exception, match=r"'\*\.down_prj'.*matched no linear"):
        compiled(torch.randn(2, 8, 64))


def test_configure_warns_for_glob_matching_nothing():
    with pytest.warns(HaloFallbackWarning, match=r"'\*\.down_prj'.*matched no linear"):
        halo_compile.configure(MLP(), {"layers": {"*.down_prj": None, "up": None}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        halo_compile.configure(MLP(), {"layers": {"up": None, "*": {"format": "int8"}}})
    assert not halo_warnings(caught)
