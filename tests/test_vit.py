"""The ViT around the layers: structure, parameter layout, checkpoint conversion, torch.compile."""

import math

import pytest
import torch

from models.vit import ViT, build_layer, convert_reference_checkpoint, sinusoidal_table
from models.vit_layers import LAYER_REGISTRY, options_from

SMALL = dict(img_size=16, num_classes=5, patch_size=4, num_layers=2, num_heads=2, d_hidden=16, d_mlp=32,
             dropout=0.0, attention_dropout=0.0)


def small_vit(layer="Attention", **options):
    """A small ViT of ``layer`` with K = 3 and those of ``options`` that the layer takes."""
    torch.manual_seed(0)
    return ViT(layer=layer, layer_options=options_from(layer, {"K": 3, **options}), **SMALL)


def test_sinusoidal_table_follows_the_formula():
    table = sinusoidal_table(7, 6)
    for pos in range(7):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_table(4, 5).shape == (4, 5)


def test_forward_follows_the_spec_step_by_step():
    model = small_vit().double().eval()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    patches = model.patch_embedding.linear_projection(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.positional_encoding.cls_tokens.expand(3, -1, -1),
                   model.patch_embedding.norm(patches)], dim=1) + model.positional_encoding.pe
    for block in model.transformer_encoder:
        x = x + block.attention(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    torch.testing.assert_close(model(images), model.classifier(x[:, 0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer", list(LAYER_REGISTRY))
def test_every_layer_trains_in_the_vit_with_odd_batches(layer):
    model = small_vit(layer, branch_ratio=0.5, local_window=4)
    logits = model(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "W_k" not in n and "W_q" not in n)


def test_parameter_names_follow_the_reference_layout():
    names = set(small_vit("ConvNNAttention").state_dict())
    expected = {
        "patch_embedding.linear_projection.weight", "patch_embedding.linear_projection.bias",
        "patch_embedding.norm.weight", "positional_encoding.cls_tokens", "positional_encoding.pe",
        "transformer_encoder.0.norm1.weight", "transformer_encoder.0.norm2.bias",
        "transformer_encoder.1.attention.W_q.weight", "transformer_encoder.1.attention.W_k.weight",
        "transformer_encoder.1.attention.W_v.weight", "transformer_encoder.1.attention.W_o.weight",
        "transformer_encoder.1.attention.conv.weight", "transformer_encoder.0.mlp.0.weight",
        "transformer_encoder.0.mlp.3.bias", "classifier.weight", "classifier.bias",
    }
    assert expected <= names
    assert small_vit().state_dict()["positional_encoding.cls_tokens"].shape == (1, 1, 16)
    assert small_vit().state_dict()["positional_encoding.pe"].shape == (1, 17, 16)
    separable = small_vit("ConvNNAttention", convolution_type="depthwise-separable").state_dict()
    assert {"transformer_encoder.0.attention.conv.0.weight", "transformer_encoder.0.attention.conv.1.weight"} <= set(
        separable)
    layer_keys = {
        "KvtAttention": {"qkv", "proj"}, "LocalAttention": {"to_qkv", "to_out"},
        "SparseAttention": {"q_proj", "k_proj", "v_proj", "out_proj"}, "Conv1d": {"W_x", "conv", "W_o"},
        "BranchConv": {"convnn", "conv1d", "pointwise_linear"},
        "BranchAttention": {"convnn", "attention", "pointwise_linear"},
    }
    for layer, modules in layer_keys.items():
        keys = small_vit(layer, branch_ratio=0.5).state_dict()
        found = {k.split(".")[3] for k in keys if k.startswith("transformer_encoder.0.attention.")}
        assert found == modules, layer


def test_reference_checkpoint_converts_by_swapping_query_and_key_in_convnn_layers_only():
    model = small_vit("BranchAttention", branch_ratio=0.5)
    reference = {name: torch.randn_like(value) for name, value in model.state_dict().items()}
    converted = convert_reference_checkpoint(reference)
    model.load_state_dict(converted, strict=True)
    convnn = "transformer_encoder.1.attention.convnn."
    attention = "transformer_encoder.1.attention.attention."
    assert torch.equal(converted[convnn + "W_q.weight"], reference[convnn + "W_k.weight"])
    assert torch.equal(converted[convnn + "W_k.weight"], reference[convnn + "W_q.weight"])
    assert torch.equal(converted[attention + "W_q.weight"], reference[attention + "W_q.weight"])
    assert torch.equal(converted[convnn + "W_v.weight"], reference[convnn + "W_v.weight"])

    plain = small_vit("ConvNNAttention").state_dict()
    plain_converted = convert_reference_checkpoint(plain)
    prefix = "transformer_encoder.0.attention."
    assert torch.equal(plain_converted[prefix + "W_q.weight"], plain[prefix + "W_k.weight"])


def test_converted_reference_checkpoint_computes_the_reference_similarity():
    """Reference ConvNN scored a token's key against candidate queries: after the swap, ours matches."""
    model = small_vit("ConvNNAttention").double().eval()
    layer = model.transformer_encoder[0].attention
    x = torch.randn(2, model.num_tokens, 16, dtype=torch.float64)
    reference_scores = (x @ layer.W_k.weight.t()) @ (x @ layer.W_q.weight.t()).transpose(1, 2)
    reference_checkpoint = {name: value.clone() for name, value in model.state_dict().items()}
    model.load_state_dict(convert_reference_checkpoint(reference_checkpoint))
    torch.testing.assert_close(layer._similarity(x, None) * math.sqrt(16), reference_scores, rtol=0, atol=1e-10)


def test_activation_checkpointing_gives_the_same_gradients():
    images = torch.randn(2, 3, 16, 16)
    grads = []
    for enabled in (False, True):
        model = small_vit("ConvNNAttention")
        model.set_activation_checkpointing(enabled)
        model(images).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("options,flag", [
    (dict(patch_size=5), "--patch_size"),
    (dict(num_heads=3), "--num_heads"),
    (dict(layer="ConvNNAttention", layer_options=dict(K=18)), "--K"),
    (dict(layer="KvtAttention", layer_options=dict(K=18)), "--K"),
    (dict(layer="ConvNNAttention", layer_options=dict(K=3, sampling_type="spatial", num_samples=5)),
     "--num_samples"),
    (dict(layer="Nope"), "--layer"),
    (dict(dropout=1.0), "--dropout"),
    (dict(num_layers=0), "--num_layers"),
])
def test_model_level_constraints_name_the_flag(options, flag):
    with pytest.raises(ValueError, match="^" + flag + ":"):
        ViT(**{**SMALL, **options})


def test_layer_options_default_to_the_table_and_only_the_layers_own_are_taken():
    layer = ViT(**SMALL, layer="ConvNNAttention", layer_options={"K": 5}).transformer_encoder[0].attention
    assert (layer.K, layer.convolution_type, layer.sampling_type) == (5, "depthwise", "all")
    with pytest.raises(TypeError):
        ViT(**SMALL, layer="Attention", layer_options={"K": 5})


def compile_cases():
    options = dict(K=3, kernel_size=3, local_window=4, sparse_mode="local", sparse_context_window=4)
    for name in LAYER_REGISTRY:
        yield pytest.param(name, options, id=name)
    yield pytest.param("ConvNNAttention", dict(options, sampling_type="spatial", num_samples=3,
                                               coordinate_encoding=True, convolution_type="standard"),
                       id="ConvNNAttention-spatial-coordinates")


@pytest.mark.slow
@pytest.mark.parametrize("name,options", list(compile_cases()))
def test_every_layer_compiles_and_matches_eager(name, options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = build_layer(name, d_hidden=24, num_heads=3, attention_dropout=0.0, num_tokens=17, grid_size=(4, 4),
                        **options_from(name, options)).eval()
    x = torch.randn(5, 17, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=name == "ConvNNAttention")
    compiled_out = compiled(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    eager_out = layer(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-4)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=1e-4)


# The parameters of one block's layer, names and shapes, as recorded from the layers before their options
# moved into one table: checkpoints of earlier runs and reference checkpoints load only while they stay.
LAYER_STATE = {
    "Attention": {"W_q.weight": (16, 16), "W_k.weight": (16, 16), "W_v.weight": (16, 16), "W_o.weight": (16, 16)},
    "ConvNNAttention": {"W_q.weight": (16, 16), "W_k.weight": (16, 16), "W_v.weight": (16, 16),
                        "W_o.weight": (16, 16), "conv.weight": (16, 1, 3)},
    "KvtAttention": {"qkv.weight": (48, 16), "proj.weight": (16, 16)},
    "LocalAttention": {"to_qkv.weight": (384, 16), "to_out.weight": (16, 128)},
    "SparseAttention": {"q_proj.weight": (16, 16), "k_proj.weight": (16, 16), "v_proj.weight": (16, 16),
                        "out_proj.weight": (16, 16)},
    "Conv1d": {"W_x.weight": (16, 16), "W_x.bias": (16,), "conv.weight": (8, 8, 9), "conv.bias": (8,),
               "W_o.weight": (16, 16), "W_o.bias": (16,)},
    "BranchConv": {"convnn.W_q.weight": (8, 8), "convnn.W_k.weight": (8, 8), "convnn.W_v.weight": (8, 8),
                   "convnn.W_o.weight": (8, 8), "convnn.conv.weight": (8, 1, 3), "conv1d.W_x.weight": (8, 8),
                   "conv1d.W_x.bias": (8,), "conv1d.conv.weight": (4, 4, 9), "conv1d.conv.bias": (4,),
                   "conv1d.W_o.weight": (8, 8), "conv1d.W_o.bias": (8,), "pointwise_linear.weight": (16, 16),
                   "pointwise_linear.bias": (16,)},
    "BranchAttention": {"convnn.W_q.weight": (8, 8), "convnn.W_k.weight": (8, 8), "convnn.W_v.weight": (8, 8),
                        "convnn.W_o.weight": (8, 8), "convnn.conv.weight": (8, 1, 3), "attention.W_q.weight": (8, 8),
                        "attention.W_k.weight": (8, 8), "attention.W_v.weight": (8, 8),
                        "attention.W_o.weight": (8, 8), "pointwise_linear.weight": (16, 16),
                        "pointwise_linear.bias": (16,)},
    "ConvNNAttention standard": {"W_q.weight": (16, 16), "W_k.weight": (16, 16), "W_v.weight": (16, 16),
                                 "W_o.weight": (16, 16), "conv.weight": (16, 16, 3)},
    "ConvNNAttention depthwise-separable": {"W_q.weight": (16, 16), "W_k.weight": (16, 16), "W_v.weight": (16, 16),
                                            "W_o.weight": (16, 16), "conv.0.weight": (16, 1, 3),
                                            "conv.1.weight": (16, 16, 1)},
    "ConvNNAttention standard coordinates": {"W_q.weight": (16, 16), "W_k.weight": (16, 16),
                                             "W_v.weight": (16, 16), "W_o.weight": (16, 16),
                                             "conv.weight": (16, 17, 3)},
    "ConvNNAttention spatial": {"W_q.weight": (16, 16), "W_k.weight": (16, 16), "W_v.weight": (16, 16),
                                "W_o.weight": (16, 16), "conv.weight": (16, 1, 3)},
    "BranchConv ratio 0": {"conv1d.W_x.weight": (16, 16), "conv1d.W_x.bias": (16,), "conv1d.conv.weight": (8, 8, 9),
                           "conv1d.conv.bias": (8,), "conv1d.W_o.weight": (16, 16), "conv1d.W_o.bias": (16,)},
    "BranchConv ratio 1": {"convnn.W_q.weight": (16, 16), "convnn.W_k.weight": (16, 16),
                           "convnn.W_v.weight": (16, 16), "convnn.W_o.weight": (16, 16),
                           "convnn.conv.weight": (16, 1, 3)},
    "BranchAttention ratio 0": {"attention.W_q.weight": (16, 16), "attention.W_k.weight": (16, 16),
                                "attention.W_v.weight": (16, 16), "attention.W_o.weight": (16, 16)},
    "BranchAttention ratio 1": {"convnn.W_q.weight": (16, 16), "convnn.W_k.weight": (16, 16),
                                "convnn.W_v.weight": (16, 16), "convnn.W_o.weight": (16, 16),
                                "convnn.conv.weight": (16, 1, 3)},
}
LAYER_STATE_OPTIONS = {
    "ConvNNAttention standard": dict(convolution_type="standard"),
    "ConvNNAttention depthwise-separable": dict(convolution_type="depthwise-separable"),
    "ConvNNAttention standard coordinates": dict(convolution_type="standard", coordinate_encoding=True),
    "ConvNNAttention spatial": dict(sampling_type="spatial", num_samples=2),
    "BranchConv ratio 0": dict(branch_ratio=0.0), "BranchConv ratio 1": dict(branch_ratio=1.0),
    "BranchAttention ratio 0": dict(branch_ratio=0.0), "BranchAttention ratio 1": dict(branch_ratio=1.0),
}


@pytest.mark.parametrize("case", list(LAYER_STATE))
def test_layer_parameters_keep_their_recorded_names_and_shapes(case):
    layer = case.split()[0]
    model = small_vit(layer, **LAYER_STATE_OPTIONS.get(case, {}))
    prefix = "transformer_encoder.0.attention."
    state = {key[len(prefix):]: tuple(value.shape) for key, value in model.state_dict().items()
             if key.startswith(prefix)}
    assert state == LAYER_STATE[case]
