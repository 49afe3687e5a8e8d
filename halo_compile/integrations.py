"""Training with halo under frameworks that own the training loop: the Hugging Face Trainer.

`TrainingArguments(torch_compile=True, torch_compile_backend="halo")` does not work: accelerate's
dynamo plugin accepts only its own enum of backend names ("'HALO' is not a valid
DynamoBackend"). Instead the model is compiled *in place* (`nn.Module.compile`: the module's
`__call__` goes through `torch.compile`, the module object stays what it was). So the Trainer
keeps seeing the model it was given:

- saving: `save_model` / checkpoints write the model's own `state_dict` keys (no `_orig_mod.`
  prefix, as a `torch.compile(model)` wrapper would add), and `from_pretrained` loads them into a
  plain model; a PEFT model saves its adapters as usual;
- evaluation: `model.eval()` under `no_grad` compiles one more graph (a forward-only one);
- gradient accumulation and the loss normalisation (`num_items_in_batch`) are the Trainer's own;
  they cause no recompilation.

    from halo_compile.integrations import HaloCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HaloCallback({"format": "fp8_e4m3", "hadamard": "halo2"})])

`compile_in_place(model, options)` does the same outside the Trainer (a plain loop, a PyTorch
Lightning module's `configure_model`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from transformers import TrainerCallback

from halo_compile import fallbacks
from halo_compile.config import HaloConfig, config_from_call


def compile_in_place(model: torch.nn.Module,
                     options: Union[HaloConfig, Mapping[str, Any], None] = None,
                     **kwargs) -> torch.nn.Module:
    """Compile `model` with backend="halo" in place and return it. Options are validated now, so
    a typo fails here rather than at the first training step, and `layers` globs are checked
    against the model's linears (halo_compile/fallbacks.py)."""
    config = config_from_call(options, kwargs)  # validated now
    fallbacks.check_model_layer_globs(model, config)
    model.compile(backend="halo", options=config)
    return model


class HaloCallback(TrainerCallback):
    """Compiles the Trainer's model with halo when the Trainer is built, so training and
    evaluation both run through it. Leave `TrainingArguments(torch_compile=False)` (the default):
    the Trainer would otherwise compile the model a second time, with a backend of its own."""

    def __init__(self, options: Union[HaloConfig, Mapping[str, Any], None] = None, **kwargs):
        self.options = config_from_call(options, kwargs)

    def on_init_end(self, args, state, control, model: Optional[torch.nn.Module] = None,
                    **kwargs):
        if args.torch_compile:
            raise ValueError("HaloCallback compiles the model itself: set "
                             "TrainingArguments(torch_compile=False)")
        compile_in_place(model, self.options)
