"""The noise (docs/method.md, "Noise"): its statistics, the formula with the drawn noise, the eval expectation, the
redraw in backward, and fused slices."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_decaylora import DecayLoraConfig, initialize_from_activations
from tests.conftest import TwoLayerNet

TOTAL = 1000  # with the original specification's schedule: d(500) = 0.5, d(850) = 0.0625, d(896) = 0.005, d(900) = 0
SCHEDULE = dict(total_steps=TOTAL, decay_start=0.1, decay_end=0.9)


def make(noise="vanish", noise_stats="tensor", init_weights=False, step=500, **kwargs):
    """TwoLayerNet with DecayLoRA on both layers, random A, B and C, at ``step``."""
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], **SCHEDULE,
                                                          noise=noise, noise_stats=noise_stats,
                                                          init_weights=init_weights, **kwargs))
    with torch.no_grad():
        for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
            layer.decaylora_C["default"].uniform_(-0.3, 0.3)
    model.base_model.set_step(step)
    return model


def decay(model):
    return model.base_model.schedule_state()["decay_factor"]


def effective_weights(model, layer, draws):
    """``d W + N`` of a Linear layer (canonical ``(out, in)``), read from training forwards on the identity with the
    adapter and C zeroed: one matrix per forward."""
    with torch.no_grad():
        layer.decaylora_B["default"].zero_()
        layer.decaylora_C["default"].zero_()
    base = layer.get_base_layer()
    bias = 0 if base.bias is None else base.bias.detach() * decay(model)
    layer.train()
    with torch.no_grad():
        return torch.stack([(layer(torch.eye(layer.in_features)) - bias).T for _ in range(draws)])


@pytest.mark.parametrize("noise_stats", ["tensor", "channel"])
@pytest.mark.parametrize("noise, step", [("vanish", 500), ("keep", 500), ("keep", 950)])
def test_noise_keeps_mean_and_variance_of_the_weight(noise, noise_stats, step):
    model = make(noise=noise, noise_stats=noise_stats, step=step)
    layer = model.base_model.model.lin0
    W, d = layer.get_base_layer().weight.detach(), decay(model)
    draws = effective_weights(model, layer, 400)
    noise = draws - d * W
    if noise_stats == "tensor":
        m, s2 = W.mean(), W.var(unbiased=False)
        assert noise.mean().item() == pytest.approx((1 - d) * m.item(), abs=0.01 * W.std().item())
        assert noise.var(unbiased=False).item() == pytest.approx((1 - d**2) * s2.item(), rel=0.03)
        assert draws.var(unbiased=False).item() == pytest.approx(s2.item(), rel=0.03)
    else:
        m, s2 = W.mean(dim=1), W.var(dim=1, unbiased=False)
        standard_error = (1 - d**2) ** 0.5 * s2.sqrt() / (noise.shape[0] * noise.shape[2]) ** 0.5
        assert ((noise.mean(dim=(0, 2)) - (1 - d) * m).abs() < 5 * standard_error).all()
        torch.testing.assert_close(noise.var(dim=(0, 2), unbiased=False), (1 - d**2) * s2, rtol=0.08, atol=0)
        torch.testing.assert_close(draws.var(dim=(0, 2), unbiased=False), s2, rtol=0.08, atol=0)
    assert not torch.equal(draws[0], draws[1])  # fresh noise every training forward


def test_channel_and_tensor_statistics_differ():
    """The test net's rows have different scales, so per-channel noise must not look like per-tensor noise."""
    variances = {}
    for stats in ("tensor", "channel"):
        model = make(noise="keep", noise_stats=stats)
        layer = model.base_model.model.lin0
        noise = effective_weights(model, layer, 100) - 0.5 * layer.get_base_layer().weight
        variances[stats] = noise.var(dim=(0, 2), unbiased=False)
    assert variances["channel"][-1] / variances["channel"][0] > 10
    assert variances["tensor"][-1] / variances["tensor"][0] < 1.5


@pytest.mark.parametrize("calibrated", [False, True])
def test_with_the_svd_start_the_noise_keeps_the_statistics_of_the_part_that_fades(calibrated):
    """That part is ``W - s B0 A0`` (the top part goes with the adapter), and it changes with the calibration."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0"], **SCHEDULE,
                                                          noise="keep"))
    layer = model.base_model.model.lin0
    if calibrated:
        initialize_from_activations(model, [torch.randn(256, 24) @ torch.diag(torch.logspace(0, -2, 24))])
    with torch.no_grad():
        residual = layer.get_base_layer().weight - layer.get_delta_weight("default", decay=0.0)  # W - s B0 A0
        layer.decaylora_B0["default"].zero_()  # so that the identity probe reads the frozen term alone
    model.base_model.set_step(500)
    noise = effective_weights(model, layer, 400) - 0.5 * layer.get_base_layer().weight
    assert noise.mean().item() == pytest.approx(0.5 * residual.mean().item(), abs=0.01 * residual.std().item())
    assert noise.var(unbiased=False).item() == pytest.approx(0.75 * residual.var(unbiased=False).item(), rel=0.03)
    W = layer.get_base_layer().weight
    assert residual.var().item() < 0.8 * W.var().item()  # so matching W's statistics would fail


@pytest.mark.parametrize("noise_stats", ["tensor", "channel"])
@pytest.mark.parametrize("step", [500, 896])  # d = 0.5 and d = 0.005
def test_noisy_training_forward_is_the_formula_with_the_drawn_noise(step, noise_stats):
    """``d (W x + b) + N x + s B A x + C``, with N read off a replica, which draws the same noise."""
    model = make(noise="keep", noise_stats=noise_stats, step=step)
    replica = copy.deepcopy(model)
    d = decay(model)
    noise = effective_weights(replica, replica.base_model.model.lin0, 1)[0] - d * replica.base_model.model.lin0.weight
    layer, x = model.base_model.model.lin0, torch.randn(16, 24)
    base = layer.get_base_layer()
    assert noise.std().item() > 0.5 * base.weight.std().item()  # a real draw, not the expectation
    layer.train()
    with torch.no_grad():
        A, B, C = layer.decaylora_A["default"], layer.decaylora_B["default"], layer.decaylora_C["default"]
        expected = d * (x @ base.weight.T + base.bias) + x @ noise.T + layer.scaling["default"] * x @ A.T @ B.T + C
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise, step", [("vanish", 850), ("vanish", 950), ("off", 500), ("keep", 0)])
def test_no_noise_where_the_schedule_has_none(noise, step):
    model = make(noise=noise, step=step)
    assert model.base_model.schedule_state()["noise_active"] is False
    x = torch.randn(6, 24)
    model.train()
    first, second = model(x), model(x)
    model.eval()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, model(x))


@pytest.mark.parametrize("step", [300, 500, 850])
@pytest.mark.parametrize("noise", ["vanish", "keep"])
def test_eval_is_the_expectation_of_the_training_forward(step, noise):
    model = make(noise=noise, step=step)
    layer, x = model.base_model.model.lin0, torch.randn(64, 24)  # the expectation is per layer (linear in W)
    layer.train()
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(400)])
        layer.eval()
        evaluated = layer(x)
    # unbiased: the error of the sample mean is at the level of its standard error (about 0.8 of it, on average)
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert (draws.mean(0) - evaluated).abs().mean() <= 1.2 * standard_error.mean() + 1e-5


def test_one_frozen_product_per_training_forward():
    """The noise is folded into the weight: the noisy step costs the matmul FLOPs of the plain one."""
    x = torch.randn(32, 24)
    flops = {}
    for step in (5, 500):
        model = make(noise="keep", step=step).train()
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        flops[step] = counter.get_total_flops()
    assert flops[500] == flops[5]


@pytest.mark.parametrize(
    "make_base, input_shape",
    [
        (lambda: nn.Linear(12, 10), (3, 5, 12)),
        (lambda: Conv1D(10, 12), (3, 5, 12)),
        (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (1, 2, 7, 7)),
        (lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2), (1, 2, 7, 7)),
        (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), (1, 2, 7, 7)),
    ],
    ids=["linear", "conv1d", "conv2d-stride", "conv2d-same", "conv2d-reflect"],
)
def test_noisy_weight_is_drawn_again_in_backward_not_kept(make_base, input_shape):
    """The noise phase's input gradient is the one through ``d W + N`` (checked against finite differences, each call
    replaying the same draw), yet no W-sized tensor is kept for backward."""
    torch.manual_seed(0)
    model = get_peft_model(nn.ModuleDict({"layer": make_base()}), DecayLoraConfig(
        r=3, target_modules=["layer"], **SCHEDULE, noise="keep", init_weights=False)).double()
    layer = model.base_model.model["layer"].train()

    def noisy_forward(x):
        model.base_model.set_step(500)  # moving the schedule replays its sequence of draws
        return layer(x)

    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        drawn, expected = noisy_forward(x), layer.eval()(x)
    assert not torch.allclose(drawn, expected)  # a draw, not the expectation
    layer.train()
    assert torch.autograd.gradcheck(noisy_forward, (x,), eps=1e-6, atol=1e-5)
    saved_sizes = []  # elements of every tensor autograd keeps (a transposed view of the weight counts too)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        noisy_forward(x)
    assert layer.get_base_layer().weight.numel() not in saved_sizes


def gpt2_with_scaled_slices():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16)).eval()
    with torch.no_grad():  # Q, K and V at clearly different scales, so that per-slice statistics matter
        w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out)
        w[:, 24:48] *= 4.0
        w[:, 48:] = w[:, 48:] * 0.25 + 0.05
    return model


def neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4)).eval()


@pytest.mark.parametrize("build, name, slices", [(gpt2_with_scaled_slices, "c_attn", [0] * 24 + [1] * 24 + [2] * 24),
                                                 (neox, "query_key_value", ([0] * 8 + [1] * 8 + [2] * 8) * 4)])
def test_noise_statistics_are_per_slice_of_a_fused_layer(build, name, slices):
    model = get_peft_model(build(), DecayLoraConfig(r=2, target_modules=[name], **SCHEDULE, noise="keep",
                                                    init_weights=False))
    model.base_model.set_step(500)
    layer = next(m for n, m in model.named_modules() if n.endswith(name))
    W = layer.get_base_layer().weight.detach()
    W = W.T if W.shape[0] == layer.in_features else W
    noise = effective_weights(model, layer, 300) - 0.5 * W
    ids = torch.tensor(slices)
    for slice_id in range(3):
        rows = ids == slice_id
        m, s2 = W[rows].mean(), W[rows].var(unbiased=False)
        assert noise[:, rows].var(unbiased=False).item() == pytest.approx(0.75 * s2.item(), rel=0.05)
        assert noise[:, rows].mean().item() == pytest.approx(0.5 * m.item(), abs=0.02 * s2.sqrt().item())
    if name == "c_attn":  # the slices' scales are 1, 4 and 0.25: one pooled variance would fail the above
        variances = [noise[:, ids == i].var().item() for i in range(3)]
        assert variances[1] > 8 * variances[0] > 8 * variances[2]


def test_a_slice_left_out_keeps_its_frozen_weight_at_every_step():
    base = gpt2_with_scaled_slices()
    reference = copy.deepcopy(base).transformer.h[0].attn.c_attn
    config = DecayLoraConfig(r=2, target_modules=["c_attn"], **SCHEDULE, noise="keep", init_weights=False,
                             fused_enable={"c_attn": [True, False, True]})
    model = get_peft_model(base, config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.decaylora_A["default"].shape == (4, 24) and layer.decaylora_B["default"].shape == (48, 2)
    x = torch.randn(5, 24)
    for step in (500, 950):
        model.base_model.set_step(step)
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            with torch.no_grad():
                out, frozen = layer(x), reference(x)
            torch.testing.assert_close(out[:, 24:48], frozen[:, 24:48], rtol=1e-6, atol=1e-6)  # K: frozen + C = 0
            assert not torch.allclose(out[:, :24], frozen[:, :24])
    effective = effective_weights(model, layer, 2)
    assert torch.equal(effective[:, 24:48], reference.weight.T[24:48].expand(2, -1, -1))  # no decay, no noise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_noise_in_a_half_precision_base_model(dtype):
    base = TwoLayerNet().to(dtype)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], total_steps=100,
                                                 noise="vanish"))
    x = torch.randn(4, 24, dtype=dtype)
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.base_model.set_step(30)  # d = 0.5 with the default schedule
    model.train()
    assert model.base_model.schedule_state()["noise_active"]  # the noise is drawn in the model's dtype
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert model.base_model.model.lin0.decaylora_A["default"].grad is not None
    model.eval()
    expected = model(x)
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)
