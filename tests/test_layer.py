"""One DecayLoRA layer: what the forward skips, what trains, and where its schedule lives."""

import copy
import pickle

import pytest
import torch
from peft import get_peft_model

from peft_decaylora import DecayLoraConfig
from tests.conftest import TwoLayerNet

TOTAL = 1000


def make(**kwargs):
    config = dict(r=4, target_modules=["lin0", "lin1"], total_steps=TOTAL, init_weights=False, **kwargs)
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(**config))
    with torch.no_grad():
        model.base_model.model.lin1.decaylora_C["default"].uniform_(-0.3, 0.3)
    return model


def test_the_frozen_product_is_skipped_at_zero_decay():
    model = make()
    model.base_model.set_step(TOTAL)
    x = torch.randn(4, 24)
    model.eval()
    expected = model(x)
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            getattr(model.base_model.model, name).get_base_layer().weight.fill_(float("nan"))
    model.train()
    assert torch.equal(model(x), expected)  # NaN weights are never read, in either mode


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = make()
    reference = TwoLayerNet()
    model.base_model.set_step(500)
    with torch.no_grad():
        model.base_model.model.lin1.decaylora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.base_model.merge_adapter(safe_merge=True)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert not lin0.merged and not lin1.merged  # the layer merged before the failing one was unmerged again
    assert lin1.get_base_layer().bias is None
    assert torch.equal(lin0.get_base_layer().weight, reference.lin0.weight)
    assert torch.equal(lin1.get_base_layer().weight, reference.lin1.weight)


def test_merging_creates_a_bias_for_C_and_unmerging_removes_it():
    model = make()
    model.base_model.set_step(500)
    lin1 = model.base_model.model.lin1.get_base_layer()
    model.base_model.merge_adapter()
    assert lin1.bias is not None
    model.base_model.unmerge_adapter()
    assert lin1.bias is None


def test_bias_compensation_off_keeps_C_frozen_at_zero():
    model = make(bias_compensation=False)
    layer = model.base_model.model.lin0
    assert not layer.decaylora_C["default"].requires_grad and layer.decaylora_B["default"].requires_grad
    model.base_model.set_adapter("default")  # activating the adapter again keeps C frozen
    assert not layer.decaylora_C["default"].requires_grad
    assert make().base_model.model.lin0.decaylora_C["default"].requires_grad


def test_the_svd_start_is_frozen_and_saved_with_the_adapter():
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL))
    layer = model.base_model.model.lin0
    assert not layer.decaylora_B0["default"].requires_grad and layer.decaylora_B["default"].requires_grad
    assert not layer.decaylora_B["default"].any() and layer.decaylora_B0["default"].any()  # B starts at 0
    assert any("decaylora_B0" in key for key in model.state_dict())
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * 24 + 40 * 4 + 40  # A, B and C, not B0


def test_the_schedule_is_saved_with_the_state_dict_and_survives_copies():
    model = make()
    model.base_model.set_step(300)
    assert model.base_model.schedule_state() == {
        "step": 300, "decay_factor": 0.5, "noise_active": False, "noise_scale": 0.0}
    steps = {k: v for k, v in model.state_dict().items() if "decaylora_step" in k}
    assert len(steps) == 2 and all(v.item() == 300 and v.dtype == torch.long for v in steps.values())
    model.to(torch.float64)
    assert all(v.dtype == torch.long for k, v in model.state_dict().items() if "decaylora_step" in k)
    x = torch.randn(3, 24, dtype=torch.float64)
    model.eval()
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert copied.base_model.schedule_state()["step"] == unpickled.base_model.schedule_state()["step"] == 300
    torch.testing.assert_close(unpickled(x), model(x))
    copied.base_model.set_step(900)  # the copies are independent
    assert model.base_model.schedule_state()["step"] == 300
    assert not torch.allclose(copied(x), model(x))


def test_loading_a_state_dict_moves_the_schedule():
    model = make()
    model.base_model.set_step(700)
    other = make()
    assert other.base_model.schedule_state()["step"] == 0
    other.load_state_dict(model.state_dict())
    assert other.base_model.schedule_state()["step"] == 700
    x = torch.randn(3, 24)
    model.eval(), other.eval()
    torch.testing.assert_close(other(x), model(x))


def test_training_without_a_schedule_length_is_an_error():
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0"]))
    x = torch.randn(2, 24)
    model.eval()
    model(x)  # evaluating before training is fine: step 0 is warm-up
    model.train()
    with pytest.raises(RuntimeError, match="DecayLoraCallback"):
        model(x)
    model.base_model.set_total_steps(100)
    model(x)
