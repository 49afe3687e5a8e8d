"""HaloConfig: parsing and validation of torch.compile(options=...), per-layer globs,
configure()."""

import re

import pytest
import torch

import halo_compile
from halo_compile import HADAMARD_PRESETS, Hadamard, HaloConfig, LayerConfig

MIN16 = {"min_features": 16, "compiler": "aot_eager"}


# --------------------------------------------------------------------------------------------
# Defaults and every key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [None, {}])
def test_defaults(options):
    config = HaloConfig.from_options(options)
    assert config.nonfinite == "raise"
    assert config.compiler == "inductor"
    assert config.cudagraphs is False
    assert config.layers == ()
    d = config.defaults
    assert d.format == "fp8_e4m3"
    assert d.hadamard == Hadamard(forward="inner", grad_input="outer", grad_weight="none")
    assert d.hadamard_block == 256
    assert d.max_block == 256
    assert d.scale == "row"
    assert d.grad_rounding == "nearest"
    assert d.fast_accum is True
    assert d.min_features == 64
    assert config.for_layer("anything.at.all") == d


def test_every_key():
    options = {
        "format": "int8",
        "hadamard": "halo1",
        "hadamard_block": "full",
        "scale": "tensor",
        "grad_rounding": "stochastic",
        "fast_accum": False,
        "min_features": 32,
        "layers": {"lm_head": None, "*.mlp.*": {"format": "none"}},
        "nonfinite": "propagate",
        "compiler": "aot_eager",
    }
    config = HaloConfig.from_options(options)
    assert config.defaults == LayerConfig(
        format="int8", hadamard=Hadamard(forward="inner"), hadamard_block="full", scale="tensor",
        grad_rounding="stochastic", fast_accum=False, min_features=32,
    )
    assert config.defaults.max_block == 0  # "full": no limit
    assert config.nonfinite == "propagate"
    assert config.compiler == "aot_eager"
    assert config.layers == (("lm_head", None), ("*.mlp.*", {"format": "none"}))
    assert config.for_layer("lm_head") is None
    mlp = config.for_layer("model.layers.3.mlp.up_proj")
    assert mlp.format == "none"
    # The override keeps every other global setting.
    assert (mlp.scale, mlp.grad_rounding, mlp.min_features, mlp.hadamard_block) == (
        "tensor", "stochastic", 32, "full")
    assert config.for_layer("model.layers.3.self_attn.q_proj") == config.defaults


def test_layer_keys():
    """Every field of LayerConfig is a top-level option and a per-layer override key."""
    assert set(halo_compile.config.LAYER_KEYS) == {
        "format", "hadamard", "hadamard_block", "scale", "grad_rounding", "fast_accum",
        "min_features", "adapters", "cache_weights"}


def test_from_options_passes_a_config_through():
    config = HaloConfig.from_options({"format": "int8"})
    assert HaloConfig.from_options(config) is config


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256, 1024, "full"])
def test_hadamard_block_values(block):
    config = HaloConfig.from_options({"hadamard_block": block})
    assert config.defaults.hadamard_block == block
    assert config.defaults.max_block == (0 if block == "full" else block)


# --------------------------------------------------------------------------------------------
# Hadamard presets and dicts
# --------------------------------------------------------------------------------------------

PRESETS = {
    "none": ("none", "none", "none"),
    "halo0": ("none", "none", "none"),
    "halo1": ("inner", "none", "none"),
    "halo2": ("inner", "outer", "none"),
    "all_inner": ("inner", "inner", "inner"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hadamard_presets(preset):
    h = HaloConfig.from_options({"hadamard": preset}).defaults.hadamard
    assert (h.forward, h.grad_input, h.grad_weight) == PRESETS[preset]
    assert HADAMARD_PRESETS[preset] == h


def test_preset_table_is_complete():
    assert set(HADAMARD_PRESETS) == set(PRESETS)


def test_hadamard_dict():
    h = HaloConfig.from_options(
        {"hadamard": {"forward": "outer", "grad_weight": "inner"}}).defaults.hadamard
    assert h == Hadamard(forward="outer", grad_input="none", grad_weight="inner")
    h = HaloConfig.from_options({"hadamard": {}}).defaults.hadamard
    assert h == Hadamard()


def test_hadamard_instance():
    h = Hadamard(grad_input="inner")
    assert HaloConfig.from_options({"hadamard": h}).defaults.hadamard is h


def test_hadamard_per_layer_preset():
    config = HaloConfig.from_options(
        {"hadamard": "none", "layers": {"*.o_proj": {"hadamard": "all_inner"}}})
    assert config.for_layer("m.o_proj").hadamard == HADAMARD_PRESETS["all_inner"]
    assert config.for_layer("m.q_proj").hadamard == Hadamard()


# --------------------------------------------------------------------------------------------
# Errors: unknown keys and bad values name the key (and the allowed values)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["fromat", "hadamard_blocks", "Format", "layer", "dtype"])
def test_unknown_top_level_key(key):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        HaloConfig.from_options({key: "fp8_e4m3"})


def test_unknown_key_among_valid_ones():
    with pytest.raises(ValueError, match="'typo'") as info:
        HaloConfig.from_options({"format": "int8", "typo": 1, "compiler": "aot_eager"})
    # The message lists what is allowed, so the user can fix the typo.
    assert "'format'" in str(info.value) and "'nonfinite'" in str(info.value)


def test_cudagraphs_option():
    assert HaloConfig.from_options({"cudagraphs": True}).cudagraphs is True
    with pytest.raises(ValueError, match="'cudagraphs' must be True or False, got 1"):
        HaloConfig.from_options({"cudagraphs": 1})
    with pytest.raises(ValueError, match="'cudagraphs' needs compiler 'inductor', got 'aot_eager'"):
        HaloConfig.from_options({"cudagraphs": True, "compiler": "aot_eager"})


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("format", "fp4", ["fp8_e4m3", "int8", "none"]),
        ("format", "FP8", ["fp8_e4m3", "int8", "none"]),
        ("scale", "col", ["tensor", "row"]),
        ("grad_rounding", "up", ["nearest", "stochastic"]),
        ("hadamard", "halo3", ["none", "halo0", "halo1", "halo2", "all_inner"]),
        ("nonfinite", "ignore", ["raise", "propagate"]),
        ("compiler", "eager", ["inductor", "aot_eager"]),
    ],
)
def test_bad_choice(key, value, allowed):
    with pytest.raises(ValueError) as info:
        HaloConfig.from_options({key: value})
    message = str(info.value)
    assert repr(key) in message and repr(value) in message
    for choice in allowed:
        assert repr(choice) in message


@pytest.mark.parametrize("block", [100, 8, 0, -16, 24, 255, "256", True, 64.0, None])
def test_bad_hadamard_block(block):
    with pytest.raises(ValueError) as info:
        HaloConfig.from_options({"hadamard_block": block})
    message = str(info.value)
    assert "'hadamard_block'" in message
    assert "power of two" in message and "'full'" in message
    assert repr(block) in message


@pytest.mark.parametrize("value", [0, -1, 1.5, "64", None])
def test_bad_min_features(value):
    with pytest.raises(ValueError, match="'min_features'"):
        HaloConfig.from_options({"min_features": value})


@pytest.mark.parametrize("option", ["fast_accum", "cache_weights"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bad_boolean_layer_option(option, value):
    with pytest.raises(ValueError, match=f"'{option}' must be True or False") as info:
        HaloConfig.from_options({option: value})
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=f"'{option}' must be True or False"):
        HaloConfig.from_options({"layers": {"*.mlp.*": {option: value}}})


def test_bad_hadamard_dict():
    with pytest.raises(ValueError, match="'backward'") as info:
        HaloConfig.from_options({"hadamard": {"forward": "inner", "backward": "inner"}})
    assert "'grad_input'" in str(info.value)
    with pytest.raises(ValueError) as info:
        HaloConfig.from_options({"hadamard": {"grad_input": "middle"}})
    assert "hadamard.grad_input" in str(info.value) and "'middle'" in str(info.value)
    assert "'outer'" in str(info.value)
    with pytest.raises(ValueError, match="'hadamard'"):
        HaloConfig.from_options({"hadamard": 2})


def test_layers_override_with_unknown_key():
    with pytest.raises(ValueError) as info:
        HaloConfig.from_options({"layers": {"*.down_proj": {"formt": "int8"}}})
    message = str(info.value)
    assert "'formt'" in message and "'*.down_proj'" in message
    assert "'format'" in message  # allowed keys are listed
    # Global-only keys are not layer options.
    with pytest.raises(ValueError, match="'nonfinite'"):
        HaloConfig.from_options({"layers": {"lm_head": {"nonfinite": "propagate"}}})


def test_layers_override_with_bad_value():
    with pytest.raises(ValueError) as info:
        HaloConfig.from_options({"layers": {"lm_head": {"format": "fp4"}}})
    assert "'format'" in str(info.value) and "'fp4'" in str(info.value)


@pytest.mark.parametrize("layers", [["lm_head"], "lm_head", 3])
def test_layers_must_be_a_mapping(layers):
    with pytest.raises(ValueError, match="'layers'"):
        HaloConfig.from_options({"layers": layers})


def test_layers_override_must_be_dict_or_none():
    with pytest.raises(ValueError, match="lm_head"):
        HaloConfig.from_options({"layers": {"lm_head": "int8"}})


def test_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="dict"):
        HaloConfig.from_options(["format", "int8"])


# --------------------------------------------------------------------------------------------
# Per-layer globs
# --------------------------------------------------------------------------------------------


def test_exclude_lm_head():
    config = HaloConfig.from_options({"layers": {"lm_head": None}})
    assert config.for_layer("lm_head") is None
    assert config.excluded_by("lm_head") == "lm_head"
    # An exact name is not a prefix match.
    assert config.for_layer("lm_head2") == config.defaults
    assert config.for_layer("model.lm_head") == config.defaults
    assert config.excluded_by("model.lm_head") is None


def test_down_proj_to_int8():
    config = HaloConfig.from_options(
        {"format": "fp8_e4m3", "layers": {"*.mlp.down_proj": {"format": "int8"}}})
    for i in range(3):
        assert config.for_layer(f"model.layers.{i}.mlp.down_proj").format == "int8"
        assert config.for_layer(f"model.layers.{i}.mlp.up_proj").format == "fp8_e4m3"
        assert config.for_layer(f"model.layers.{i}.self_attn.o_proj").format == "fp8_e4m3"
    assert config.for_layer("down_proj").format == "fp8_e4m3"  # "*." needs a parent


def test_patterns_apply_in_order():
    # Both match: the later one wins for the keys they share, earlier keys are kept.
    config = HaloConfig.from_options({"layers": {
        "*": {"format": "int8", "scale": "tensor"},
        "lm_head": {"format": "none"},
    }})
    assert config.for_layer("lm_head").format == "none"
    assert config.for_layer("lm_head").scale == "tensor"
    assert config.for_layer("x.q_proj").format == "int8"
    config = HaloConfig.from_options({"layers": {
        "lm_head": {"format": "none"},
        "*": {"format": "int8", "scale": "tensor"},
    }})
    assert config.for_layer("lm_head").format == "int8"


def test_exclusion_then_override_and_back():
    # An exclusion followed by an override re-enables the layer (defaults + override) ...
    config = HaloConfig.from_options(
        {"layers": {"*.mlp.*": None, "*.down_proj": {"format": "int8"}}})
    assert config.for_layer("l.0.mlp.up_proj") is None
    assert config.excluded_by("l.0.mlp.up_proj") == "*.mlp.*"
    down = config.for_layer("l.0.mlp.down_proj")
    assert down is not None and down.format == "int8"
    assert config.excluded_by("l.0.mlp.down_proj") is None
    # ... and an override followed by an exclusion excludes it.
    config = HaloConfig.from_options(
        {"layers": {"*.down_proj": {"format": "int8"}, "*.mlp.*": None}})
    assert config.for_layer("l.0.mlp.down_proj") is None
    assert config.excluded_by("l.0.mlp.down_proj") == "*.mlp.*"


def test_glob_syntax():
    config = HaloConfig.from_options({"layers": {
        "model.layers.0.*": {"format": "int8"},
        "model.layers.[12].self_attn.?_proj": {"format": "none"},
    }})
    assert config.for_layer("model.layers.0.mlp.up_proj").format == "int8"
    assert config.for_layer("model.layers.10.mlp.up_proj").format == "fp8_e4m3"
    assert config.for_layer("model.layers.1.self_attn.q_proj").format == "none"
    assert config.for_layer("model.layers.2.self_attn.o_proj").format == "none"
    assert config.for_layer("model.layers.3.self_attn.o_proj").format == "fp8_e4m3"
    # Matching is case-sensitive.
    assert config.for_layer("Model.layers.0.mlp").format == "fp8_e4m3"


# --------------------------------------------------------------------------------------------
# configure(): options for a model compiled elsewhere without options=
# --------------------------------------------------------------------------------------------


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _layers(model):
    return {layer.fqn: layer for layer in halo_compile.report(model).layers}


def test_configure_returns_config_and_validates():
    model = _MLP()
    config = halo_compile.configure(model, {"format": "int8"})
    assert isinstance(config, HaloConfig) and config.defaults.format == "int8"
    assert halo_compile.configure(model, format="none").defaults.format == "none"
    with pytest.raises(ValueError, match="'fromat'"):
        halo_compile.configure(model, fromat="int8")
    with pytest.raises(ValueError, match="not both"):
        halo_compile.configure(model, {"format": "int8"}, scale="tensor")


def test_configure_used_without_options():
    torch.manual_seed(0)
    model = _MLP()
    halo_compile.configure(model, format="int8", hadamard="halo1", scale="tensor",
                           layers={"fc2": None}, **MIN16)
    compiled = torch.compile(model, backend="halo")
    compiled(torch.randn(2, 8, 64))
    layers = _layers(compiled)
    assert set(layers) == {"fc1", "fc2"}
    assert layers["fc1"].quantized and layers["fc1"].format == "int8"
    assert layers["fc1"].scale == "tensor"
    assert layers["fc1"].forward.rotation == "inner" and layers["fc1"].grad_input.rotation == "none"
    assert not layers["fc2"].quantized and "'fc2'" in layers["fc2"].reason


def test_options_take_precedence_over_configure():
    torch.manual_seed(0)
    model = _MLP()
    halo_compile.configure(model, format="int8", layers={"fc2": None}, **MIN16)
    compiled = torch.compile(model, backend="halo", options={"format": "fp8_e4m3", **MIN16})
    compiled(torch.randn(2, 8, 64))
    layers = _layers(compiled)
    assert layers["fc1"].format == "fp8_e4m3"
    assert layers["fc2"].quantized and layers["fc2"].format == "fp8_e4m3"


def test_configure_does_not_leak_to_other_models():
    torch.manual_seed(0)
    configured, other = _MLP(), _MLP()
    halo_compile.configure(configured, format="int8", **MIN16)
    halo_compile.configure(other, compiler="aot_eager")  # every other option: the default
    compiled = torch.compile(other, backend="halo")
    compiled(torch.randn(2, 8, 64))
    layers = _layers(compiled)
    assert layers["fc1"].format == "fp8_e4m3" and layers["fc2"].format == "fp8_e4m3"
    assert _layers(configured) == {}  # never compiled


@pytest.mark.parametrize("option", ["min_features", "hadamard_block"])
@pytest.mark.parametrize("value", [True, False])
def test_bool_for_an_int_option_is_refused(option, value):
    with pytest.raises(ValueError, match=repr(option)):
        HaloConfig.from_options({option: value})
    with pytest.raises(ValueError, match=repr(option)):
        HaloConfig.from_options({"layers": {"*": {option: value}}})


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_on_fallback(policy):
    assert HaloConfig.from_options({"on_fallback": policy}).on_fallback == policy
    assert HaloConfig.from_options({}).on_fallback == "warn"


def test_bad_on_fallback_is_refused():
    with pytest.raises(ValueError, match="'on_fallback'.*'warn'"):
        HaloConfig.from_options({"on_fallback": "ignore"})


def test_unmatched_layer_globs():
    config = HaloConfig.from_options({"layers": {"*.down_prj": None, "*.down_proj": None}})
    assert config.unmatched_layer_globs(["model.mlp.down_proj", "lm_head"]) == ["*.down_prj"]
