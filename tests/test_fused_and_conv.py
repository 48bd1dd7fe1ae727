"""Fused QKV projections (GPT-2 Conv1D, Phi-3, GPT-NeoX, Falcon) and Conv2d layers."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from peft_decaylora import DecayLoraConfig
from peft_decaylora.fused import slice_ids

TOTAL = 100  # default schedule: d(50) = 0.5, d(90) = 0


def gpt2(**overrides):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=4, n_positions=16, **overrides)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # give Q, K and V clearly different scales so per-slice statistics matter
        for block in model.transformer.h:
            w = block.attn.c_attn.weight  # Conv1D: (in, out)
            w[:, 24:48] *= 4.0
            w[:, 48:] = w[:, 48:] * 0.25 + 0.05
    return model


def phi3():
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return Phi3ForCausalLM(config).eval()


def neox():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4)
    return GPTNeoXForCausalLM(config).eval()


def falcon():
    torch.manual_seed(0)
    config = FalconConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_kv_heads=2, new_decoder_architecture=True)
    return FalconForCausalLM(config).eval()


ARCHITECTURES = {
    "gpt2": (gpt2, "c_attn", {"sizes": [24, 24, 24], "repeat": 1}),
    "phi3": (phi3, "qkv_proj", {"sizes": [32, 16, 16], "repeat": 1}),
    "gpt_neox": (neox, "query_key_value", {"sizes": [8, 8, 8], "repeat": 4}),
    "falcon": (falcon, "query_key_value", {"sizes": [16, 8, 8], "repeat": 2}),
}


def tokens():
    torch.manual_seed(3)
    return torch.randint(0, 50, (2, 10))


def fused_layers(model, name):
    return [m for n, m in model.named_modules() if n.endswith(name) and hasattr(m, "decaylora_A")]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layout_is_detected_and_step_zero_is_the_base_model(arch):
    build, name, layout = ARCHITECTURES[arch]
    base = build()
    reference = copy.deepcopy(base)
    # METHOD.md's initialisation reproduces the base model bit for bit (the SVD one up to rounding, tested apart)
    model = get_peft_model(base, DecayLoraConfig(r=2, target_modules=[name], total_steps=TOTAL, init_weights=True))
    assert model.peft_config["default"].fused_layouts[name] == layout
    layer = fused_layers(model, name)[0]
    assert layer.fused_layout["default"]["sizes"] == layout["sizes"]
    assert layer.decaylora_A["default"].weight.shape[0] == 2 * 3  # rank 2 per slice
    x = tokens()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)


def effective_weights(layer, draws):
    """``d W + N`` (canonical ``(out, in)``) from training forwards on the identity, with the adapter zeroed."""
    with torch.no_grad():
        layer.decaylora_B["default"].weight.zero_()
        layer.decaylora_C["default"].zero_()
    base = layer.get_base_layer()
    decay = layer.row_decay("default", layer.decay_factor("default"))
    bias = 0 if base.bias is None else base.bias.detach() * decay
    eye = torch.eye(layer.in_features)
    layer.train()
    with torch.no_grad():
        return torch.stack([(layer(eye) - bias).T for _ in range(draws)])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_noise_statistics_are_per_slice(arch):
    build, name, layout = ARCHITECTURES[arch]
    model = get_peft_model(build(), DecayLoraConfig(r=2, target_modules=[name], total_steps=TOTAL, noise="keep"))
    model.base_model.set_step(50)
    layer = fused_layers(model, name)[0]
    W = layer.kind.weight(layer.get_base_layer()).detach()
    noise = effective_weights(layer, 300) - 0.5 * W
    ids = slice_ids(layout, W.shape[0], name)
    for slice_id in range(3):
        rows = ids == slice_id
        m, s2 = W[rows].mean(), W[rows].var(unbiased=False)
        slice_noise = noise[:, rows]
        assert slice_noise.var(unbiased=False).item() == pytest.approx(0.75 * s2.item(), rel=0.05)
        assert slice_noise.mean().item() == pytest.approx(0.5 * m.item(), abs=0.02 * s2.sqrt().item())
    if arch == "gpt2":  # the slices were given scales 1, 4 and 0.25: one pooled variance would fail the above
        variances = [noise[:, ids == i].var().item() for i in range(3)]
        assert variances[1] > 8 * variances[0] > 8 * variances[2]


def test_unadapted_slice_keeps_its_frozen_weight_at_every_step():
    base = gpt2()
    reference = copy.deepcopy(base)
    config = DecayLoraConfig(r=2, target_modules=["c_attn"], total_steps=TOTAL, noise="keep", init_weights=False,
                             fused_enable={"c_attn": [True, False, True]})
    model = get_peft_model(base, config)
    layer = fused_layers(model, "c_attn")[0]
    assert layer.decaylora_A["default"].weight.shape == (4, 24)  # two adapted slices of rank 2
    assert layer.decaylora_B["default"].weight.shape == (48, 2)
    x = torch.randn(5, 24)
    ref_layer = reference.transformer.h[0].attn.c_attn
    for step in (50, 95):
        model.base_model.set_step(step)
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            with torch.no_grad():
                out = layer(x)
            # K rows: exactly the frozen layer plus C (zero-initialised), no decay, no noise
            torch.testing.assert_close(out[:, 24:48], ref_layer(x)[:, 24:48], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(out[:, :24], ref_layer(x)[:, :24])
    noise = effective_weights(layer, 20) - layer.kind.weight(layer.get_base_layer()).detach() * 0.05
    assert noise[:, :24].std() > 0 and noise[:, 48:].std() > 0
    W = layer.kind.weight(layer.get_base_layer()).detach()
    assert torch.equal(effective_weights(layer, 2)[:, 24:48], W[24:48].expand(2, -1, -1))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("step", [50, 90])
def test_merged_equals_eval_and_unmerge_is_exact(arch, step):
    build, name, layout = ARCHITECTURES[arch]
    base = build()
    reference = copy.deepcopy(base)
    config = DecayLoraConfig(r=2, target_modules=[name], total_steps=TOTAL, init_weights=False,
                             fused_enable={name: [False, True, True]})
    model = get_peft_model(base, config)
    model.base_model.set_step(step)
    with torch.no_grad():
        for layer in fused_layers(model, name):
            layer.decaylora_C["default"].normal_(0, 0.1)
    x = tokens()
    model.eval()
    expected = model(x).logits
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)
    model.base_model.unmerge_adapter()
    restored = {n.replace(".base_layer", ""): p for n, p in model.base_model.model.named_parameters()}
    for name_, p in reference.named_parameters():
        assert torch.equal(restored[name_], p), name_


def test_fused_round_trip_keeps_layout_and_outputs(tmp_path):
    config = DecayLoraConfig(r=2, target_modules=["query_key_value"], total_steps=TOTAL, init_weights=False,
                             fused_enable={"query_key_value": [True, False, True]})
    model = get_peft_model(neox(), config)
    model.base_model.set_step(70)
    model.eval()
    x = tokens()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(neox(), tmp_path).eval()
    assert loaded.peft_config["default"].fused_layouts["query_key_value"] == {"sizes": [8, 8, 8], "repeat": 4}
    torch.testing.assert_close(loaded(x).logits, expected)
    assert loaded.base_model.schedule_state()["step"] == 70


def test_wrong_explicit_layout_names_the_module():
    with pytest.raises(ValueError, match=r"c_attn.*covers 60 output features.*72"):
        get_peft_model(gpt2(), DecayLoraConfig(r=2, target_modules=["c_attn"], fused_layouts={"c_attn": [20, 20, 20]}))
    with pytest.raises(ValueError, match="fused_enable"):
        DecayLoraConfig(target_modules=["c_attn"], fused_enable={"c_attn": [False, False, False]})
    with pytest.raises(ValueError, match="fused_layouts"):
        DecayLoraConfig(target_modules=["c_attn"], fused_layouts={"c_attn": [24]})


def test_gpt2_conv1d_layers_train_and_do_not_touch_the_shared_config():
    base = gpt2(initializer_range=0.3)  # large enough embeddings for confident logits through the tied head
    config = DecayLoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], total_steps=30, decay_start=0.0,
                             decay_end=0.8, lora_alpha=8, init_weights=True, distillation="off")
    model = get_peft_model(base, config)
    assert not hasattr(config, "fan_in_fan_out")
    data = (torch.arange(12) + torch.arange(0, 48, 6)[:, None]) % 50  # learnable: next token = token + 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(30):
        model.base_model.set_step(step)
        loss = model(data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5  # while W decays to zero


# ---------------------------------------------------------------------------------------------------------- Conv2d
class SmallCNN(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, bias=False, padding_mode=padding_mode)
        self.conv3 = nn.Conv2d(24, 8, (1, 3), padding=(0, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.conv3(x).mean(dim=(2, 3)))


CONVS = ["conv1", "conv2", "conv3"]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv_step_zero_merge_and_unmerge(padding_mode):
    base = SmallCNN(padding_mode)
    reference = copy.deepcopy(base)
    x = torch.randn(2, 3, 12, 12)
    model = get_peft_model(base, DecayLoraConfig(r=3, target_modules=CONVS, total_steps=TOTAL, noise="keep",
                                                 init_weights=True))
    model.train()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for layer in (model.base_model.model.conv1, model.base_model.model.conv2):
        A, B = layer.decaylora_A["default"], layer.decaylora_B["default"]
        assert A.weight.shape[0] == 3 and B.kernel_size == (1, 1)  # k x k to r, then 1 x 1: never a full kernel
        with torch.no_grad():
            B.weight.normal_(0, 0.1)
            layer.decaylora_C["default"].normal_(0, 0.1)
    for step in (50, 95):
        model.base_model.set_step(step)
        model.eval()
        expected = model(x)
        model.base_model.merge_adapter()
        assert model.base_model.model.conv2.get_base_layer().bias is not None  # C needs a bias in the merged conv
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        model.base_model.unmerge_adapter()
        assert model.base_model.model.conv2.get_base_layer().bias is None
        for name in CONVS:
            assert torch.equal(getattr(model.base_model.model, name).get_base_layer().weight,
                               getattr(reference, name).weight)


@pytest.mark.parametrize("noise_stats", ["tensor", "channel"])
def test_conv_noise_folds_into_the_kernel_with_the_right_statistics(noise_stats):
    model = get_peft_model(SmallCNN(), DecayLoraConfig(r=3, target_modules=["conv2"], total_steps=TOTAL,
                                                       noise="keep", noise_stats=noise_stats, init_weights=True))
    model.base_model.set_step(50)
    layer = model.base_model.model.conv2
    layer.train()
    base = layer.get_base_layer()
    W = base.weight.detach()
    d, scale = layer.schedule_point("default")
    noise = torch.stack([layer._frozen_weight_builder(base, "default", d, scale, seed)() - 0.5 * W
                         for seed in range(200)])
    dims = (0, 2, 3, 4)
    if noise_stats == "tensor":
        assert noise.var().item() == pytest.approx(0.75 * W.var(unbiased=False).item(), rel=0.05)
    else:
        torch.testing.assert_close(noise.var(dim=dims), 0.75 * W.var(dim=(1, 2, 3), unbiased=False), rtol=0.1, atol=0)
        torch.testing.assert_close(noise.mean(dim=dims), 0.5 * W.mean(dim=(1, 2, 3)), rtol=0, atol=0.02)
    # the layer's forward uses exactly this weight: one convolution with the folded kernel
    x = torch.randn(2, 16, 9, 9)
    layer._forward_index.clear()
    weight = layer._frozen_weight_builder(base, "default", d, scale, layer._noise_generator_seed("default"))()
    layer._forward_index.clear()
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, base._conv_forward(x, weight, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make_base, input_shape",
    [
        (lambda: nn.Linear(12, 10), (3, 5, 12)),
        (lambda: Conv1D(10, 12), (3, 5, 12)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
        (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 8, 8)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 8, 8)),
    ],
    ids=["linear", "conv1d", "conv2d-stride", "conv2d-same", "conv2d-reflect"],
)
def test_noisy_weight_is_rebuilt_in_backward_not_saved(make_base, input_shape):
    """The noise phase's input gradient is the one through ``d W + N``, yet no W-sized tensor is kept for backward."""
    torch.manual_seed(0)
    model = get_peft_model(nn.ModuleDict({"layer": make_base()}), DecayLoraConfig(
        r=3, target_modules=["layer"], total_steps=TOTAL, noise="keep", init_weights=True))
    model.base_model.set_step(50)
    layer = model.base_model.model["layer"]
    base = layer.get_base_layer()
    layer.train()
    layer._forward_index.clear()
    seed = layer._noise_generator_seed("default")
    weight = layer._frozen_weight_builder(base, "default", *layer.schedule_point("default"), seed)()
    layer._forward_index.clear()
    x = torch.randn(input_shape, requires_grad=True)
    saved_sizes = []  # elements of every tensor autograd keeps (a transposed view of the weight counts too)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        out = layer(x)  # B = 0 and C = 0: the output is the frozen product alone
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    reference_x = x.detach().requires_grad_()
    reference = layer.kind.frozen_product(base, reference_x, weight, base.bias * 0.5)
    (reference_grad,) = torch.autograd.grad(reference, reference_x, grad_out)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, reference_grad)
    assert weight.numel() not in saved_sizes


def test_conv_training_reduces_the_loss_through_the_decay():
    torch.manual_seed(1)
    x, labels = torch.randn(32, 3, 10, 10), torch.randint(0, 4, (32,))
    model = get_peft_model(SmallCNN(), DecayLoraConfig(r=4, target_modules=CONVS, total_steps=40, lora_alpha=8,
                                                       modules_to_save=["head"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    model.train()
    for step in range(40):
        model.base_model.set_step(step)
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert model.base_model.schedule_state()["decay_factor"] == 0.0
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_conv_round_trip(tmp_path):
    model = get_peft_model(SmallCNN(), DecayLoraConfig(r=3, target_modules=CONVS, total_steps=TOTAL,
                                                       init_weights=False))
    model.base_model.set_step(60)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(SmallCNN(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected)
