"""The DecayLoRA layer against METHOD.md: step 0, noise statistics, eval expectation, merge and unmerge."""

import copy
import pickle

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peft_decaylora import DecayLoraConfig
from tests.conftest import TwoLayerNet

TOTAL = 1000  # with the default schedule: d(500) = 0.5, d(850) = 0.0625, d(900) = 0


def make(noise="vanish", noise_stats="tensor", init_weights=False, **kwargs):
    base = TwoLayerNet()
    reference = copy.deepcopy(base)
    config = DecayLoraConfig(
        r=4, target_modules=["lin0", "lin1"], total_steps=TOTAL, noise=noise, noise_stats=noise_stats,
        init_weights=init_weights, **kwargs,
    )
    model = get_peft_model(base, config)
    if not init_weights:
        with torch.no_grad():
            for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
                layer.decaylora_C["default"].uniform_(-0.3, 0.3)
    return model, reference


def effective_weights(layer, draws):
    """Recover ``d W + N`` of a Linear layer from training forwards on the identity (adapter and C zeroed)."""
    with torch.no_grad():
        layer.decaylora_B["default"].weight.zero_()
        layer.decaylora_C["default"].zero_()
    base = layer.get_base_layer()
    d = layer.decay_factor("default")
    bias = 0 if base.bias is None else base.bias.detach() * d
    eye = torch.eye(layer.in_features)
    layer.train()
    with torch.no_grad():
        return torch.stack([(layer(eye) - bias).T for _ in range(draws)])


def test_step_zero_reproduces_the_base_model():
    model, reference = make(init_weights=True)
    x = torch.randn(5, 24)
    model.train()  # training mode too: d = 1 means no decay and no noise
    assert torch.equal(model(x), reference(x))
    model.eval()
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("noise_stats", ["tensor", "channel"])
@pytest.mark.parametrize("noise, step", [("vanish", 500), ("keep", 500), ("keep", 950)])
def test_noise_keeps_mean_and_variance_of_the_weight(noise, noise_stats, step):
    model, _ = make(noise=noise, noise_stats=noise_stats)
    model.base_model.set_step(step)
    layer = model.base_model.model.lin0
    W = layer.get_base_layer().weight.detach()
    d = layer.decay_factor("default")
    draws = effective_weights(layer, 400)
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
        # per channel the effective weight keeps each channel's own statistics
        torch.testing.assert_close(draws.var(dim=(0, 2), unbiased=False), s2, rtol=0.08, atol=0)
    # fresh noise every training forward
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("noise_stats", ["tensor", "channel"])
@pytest.mark.parametrize("step", [500, 896])  # d = 0.5 and d = 0.005
def test_noisy_training_forward_is_the_formula_with_the_drawn_noise(step, noise_stats):
    """``d (W x + b) + N x + s B A x + C``, with N the draw of that forward's seed."""
    model, _ = make(noise="keep", noise_stats=noise_stats)
    model.base_model.set_step(step)
    layer = model.base_model.model.lin0
    base = layer.get_base_layer()
    d, scale = layer.schedule_point("default")
    assert d == pytest.approx(0.5 if step == 500 else 0.005)
    layer.train()
    layer._forward_index.clear()
    noisy_weight = layer._frozen_weight_builder(base, "default", d, scale, layer._noise_generator_seed("default"))()
    noise = noisy_weight - d * base.weight
    assert noise.std().item() > 0.5 * base.weight.std().item()  # a real draw, not the expectation
    layer._forward_index.clear()
    x = torch.randn(16, 24)
    with torch.no_grad():
        out = layer(x)
        A, B, C = layer.decaylora_A["default"].weight, layer.decaylora_B["default"].weight, layer.decaylora_C["default"]
        expected = d * (x @ base.weight.T + base.bias) + x @ noise.T + layer.scaling["default"] * x @ A.T @ B.T + C
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_channel_and_tensor_statistics_differ():
    """The test net's rows have different scales, so per-channel noise must not look like per-tensor noise."""
    variances = {}
    for stats in ("tensor", "channel"):
        model, _ = make(noise="keep", noise_stats=stats)
        model.base_model.set_step(500)
        noise = effective_weights(model.base_model.model.lin0, 100) - 0.5 * model.base_model.model.lin0.weight
        variances[stats] = noise.var(dim=(0, 2), unbiased=False)
    ratio = variances["channel"][-1] / variances["channel"][0]
    assert ratio > 10 and (variances["tensor"][-1] / variances["tensor"][0]) < 1.5


@pytest.mark.parametrize("noise, step", [("vanish", 850), ("vanish", 950), ("off", 500), ("keep", 0)])
def test_no_noise_where_the_schedule_has_none(noise, step):
    model, _ = make(noise=noise)
    model.base_model.set_step(step)
    assert model.base_model.schedule_state()["noise_active"] is False
    x = torch.randn(6, 24)
    model.train()
    first, second = model(x), model(x)
    model.eval()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, model(x))


@pytest.mark.parametrize("step", [0, 300, 500, 850, 900, 1000])
@pytest.mark.parametrize("noise", ["vanish", "keep", "off"])
def test_eval_is_the_expectation_and_equals_the_merged_model(step, noise):
    model, _ = make(noise=noise)
    model.base_model.set_step(step)
    layer, x = model.base_model.model.lin0, torch.randn(64, 24)  # the expectation is per layer (linear in W)
    layer.train()
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(400)])
    model.eval()
    with torch.no_grad():
        evaluated = layer(x)
    # unbiased: the error of the sample mean is at the level of its standard error (about 0.8 of it, on average)
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert (draws.mean(0) - evaluated).abs().mean() <= 1.2 * standard_error.mean() + 1e-5
    with torch.no_grad():
        evaluated = model(x)
    model.base_model.merge_adapter()
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, evaluated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 500, 1000])
def test_unmerge_restores_the_base_weights_exactly(step):
    model, reference = make()
    model.base_model.set_step(step)
    model.base_model.merge_adapter()
    lin1 = model.base_model.model.lin1.get_base_layer()
    assert lin1.bias is not None  # created to carry C where the base had none
    model.base_model.unmerge_adapter()
    assert lin1.bias is None
    for name in ("lin0", "lin1"):
        base = getattr(model.base_model.model, name).get_base_layer()
        assert torch.equal(base.weight, getattr(reference, name).weight)
        ref_bias = getattr(reference, name).bias
        assert (base.bias is None) == (ref_bias is None) and (ref_bias is None or torch.equal(base.bias, ref_bias))


def test_merge_and_unload_gives_the_eval_model_as_plain_layers():
    model, _ = make()
    model.base_model.set_step(700)
    x = torch.randn(8, 24)
    model.eval()
    expected = model(x)
    merged = model.merge_and_unload()
    assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_unload_returns_the_untouched_base_model():
    model, reference = make()
    model.base_model.set_step(1000)
    x = torch.randn(4, 24)
    torch.testing.assert_close(model.unload()(x), reference(x))


def test_safe_merge_refuses_nan_and_changes_nothing():
    model, reference = make()
    model.base_model.set_step(500)
    with torch.no_grad():
        model.base_model.model.lin1.decaylora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.base_model.merge_adapter(safe_merge=True)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert not lin1.merged and lin1.get_base_layer().bias is None
    assert torch.equal(lin1.get_base_layer().weight, reference.lin1.weight)
    # layers merged before the failing one are not left merged either
    assert not lin0.merged
    assert torch.equal(lin0.get_base_layer().weight, reference.lin0.weight)


def test_disable_adapter_gives_the_base_model():
    model, reference = make()
    model.base_model.set_step(1000)
    x = torch.randn(4, 24)
    model.eval()
    assert not torch.allclose(model(x), reference(x))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), reference(x))
    model.base_model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), reference(x))


def test_frozen_product_is_skipped_at_zero_decay():
    model, _ = make()
    model.base_model.set_step(1000)
    x = torch.randn(4, 24)
    model.eval()
    expected = model(x)
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            getattr(model.base_model.model, name).get_base_layer().weight.fill_(float("nan"))
    model.train()
    assert torch.equal(model(x), expected)  # NaN weights are never read, in either mode


def test_one_frozen_product_per_training_forward():
    """The noise is folded into the weight: the noisy forward costs the matmul FLOPs of the plain one."""
    x = torch.randn(32, 24)
    flops = {}
    for step in (0, 500):
        model, _ = make(noise="keep")
        model.base_model.set_step(step)
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        flops[step] = counter.get_total_flops()
    assert flops[500] == flops[0]


def test_bias_compensation_off_keeps_C_frozen_at_zero():
    model, _ = make(init_weights=True, bias_compensation=False)
    layer = model.base_model.model.lin0
    assert not layer.decaylora_C["default"].requires_grad
    assert layer.decaylora_B["default"].weight.requires_grad
    on, _ = make(init_weights=True)
    assert on.base_model.model.lin0.decaylora_C["default"].requires_grad


def test_schedule_state_lives_in_buffers():
    model, _ = make()
    model.base_model.set_step(500)
    assert model.base_model.schedule_state() == {
        "step": 500, "decay_factor": 0.5, "noise_active": True, "noise_scale": pytest.approx(0.75**0.5)
    }
    steps = {k: v for k, v in model.state_dict().items() if "decaylora_step" in k}
    assert len(steps) == 2 and all(v.item() == 500 and v.dtype == torch.long for v in steps.values())
    model.to(torch.float64)
    assert all(v.dtype == torch.long for k, v in model.state_dict().items() if "decaylora_step" in k)
    x = torch.randn(3, 24)
    model.eval()
    copied = copy.deepcopy(model)
    assert copied.base_model.schedule_state()["step"] == 500
    unpickled = pickle.loads(pickle.dumps(model))
    assert unpickled.base_model.schedule_state()["step"] == 500
    torch.testing.assert_close(unpickled(x.double()), model(x.double()))
    # the copies are independent
    copied.base_model.set_step(900)
    assert model.base_model.schedule_state()["step"] == 500


def test_loading_a_state_dict_moves_the_schedule():
    model, _ = make()
    model.base_model.set_step(700)
    other, _ = make()
    assert other.base_model.schedule_state()["step"] == 0
    other.load_state_dict(model.state_dict())
    assert other.base_model.schedule_state()["step"] == 700
    x = torch.randn(3, 24)
    model.eval(), other.eval()
    torch.testing.assert_close(other(x), model(x))


def test_training_without_a_schedule_length_is_an_error():
    base = TwoLayerNet()
    model = get_peft_model(base, DecayLoraConfig(r=4, target_modules=["lin0"]))
    x = torch.randn(2, 24)
    model.eval()
    model(x)  # evaluating before training is fine: step 0 is warm-up
    model.train()
    with pytest.raises(RuntimeError, match="DecayLoraCallback"):
        model(x)
    model.base_model.set_total_steps(100)
    model(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_model(dtype):
    base = TwoLayerNet().to(dtype)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], total_steps=100,
                                                 init_weights=True, noise="vanish"))
    x = torch.randn(4, 24, dtype=dtype)
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.base_model.set_step(50)
    model.train()
    assert model.base_model.schedule_state()["noise_active"]  # the noise is drawn in the model's dtype
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert model.base_model.model.lin0.decaylora_A["default"].weight.grad is not None
    model.eval()
    expected = model(x)
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)
