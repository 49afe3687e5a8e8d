"""halo_compile.testing: injected outlier channels keep a model's function and are outliers."""

import torch
import transformers

from halo_compile.testing import inject_outlier_channels


def test_injected_outliers_keep_the_logits_and_dominate_the_linear_inputs():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.__setitem__("q_in", args[0].detach().abs().amax((0, 1))))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        plain = seen["q_in"]
        after = inject_outlier_channels(model, factor=50.0)(input_ids=ids).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    # The three injected hidden channels now carry the largest activations, ~50x the rest.
    top = seen["q_in"].topk(3).indices.sort().values
    assert top.tolist() == [5, 77, 100]
    assert seen["q_in"][top].min() > 10 * plain.max()
