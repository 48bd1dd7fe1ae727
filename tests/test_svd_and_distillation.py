"""The SVD initialisation (the residual of W decays) and the hidden-state distillation from the pretrained network."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from peft_decaylora import DecayLoraConfig, initialize_from_activations
from peft_decaylora.model import hidden_state_distillation_loss

from conftest import TwoLayerNet, tiny_bert

TOTAL = 100


def top_r(weight: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).reshape(weight.shape)


def test_svd_init_starts_at_the_top_r_part_and_keeps_the_base_output():
    base = TwoLayerNet()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, DecayLoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], total_steps=TOTAL))
    x = torch.randn(5, 24)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    for name in ("lin0", "lin1"):
        layer, original = getattr(model.base_model.model, name), getattr(reference, name).weight
        torch.testing.assert_close(layer.get_delta_weight("default"), top_r(original, 4), rtol=1e-4, atol=1e-5)
        residual = layer.get_base_layer().weight
        torch.testing.assert_close(residual, original - top_r(original, 4), rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_norm(residual) < 0.9 * torch.linalg.matrix_norm(original)  # the top part left W
    model.base_model.set_step(TOTAL)  # d = 0: the adapter alone is the top-r approximation
    lin0 = model.base_model.model.lin0
    torch.testing.assert_close(lin0(x), x @ top_r(reference.lin0.weight, 4).T, rtol=1e-4, atol=1e-5)


def test_svd_init_of_conv_and_fused_slices():
    conv = nn.Conv2d(6, 10, 3, padding=1)
    reference = copy.deepcopy(conv)
    model = get_peft_model(nn.Sequential(conv), DecayLoraConfig(r=3, target_modules=["0"], total_steps=TOTAL))
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.base_model.model[0].get_delta_weight("default"), top_r(reference.weight, 3),
                               rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16)).eval()
    reference = copy.deepcopy(gpt2)
    config = DecayLoraConfig(r=2, target_modules=["c_attn"], total_steps=TOTAL, fused_enable={"c_attn": [True, False, True]})
    model = get_peft_model(gpt2, config)
    tokens = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
    layer, W = model.base_model.model.transformer.h[0].attn.c_attn, reference.transformer.h[0].attn.c_attn.weight.T
    expected = torch.cat([top_r(W[:24], 2), torch.zeros(24, 24), top_r(W[48:], 2)])  # each adapted slice its own
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.get_base_layer().weight.T[24:48], W[24:48])  # the frozen value slice is untouched


def test_unload_and_delete_give_back_the_pretrained_weight():
    reference = TwoLayerNet()
    for finish in ("unload", "delete"):
        model = get_peft_model(copy.deepcopy(reference), DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL))
        if finish == "unload":
            restored = model.unload()
        else:
            model.base_model.delete_adapter("default")
            restored = model.base_model.model
        torch.testing.assert_close(restored.lin0.weight, reference.lin0.weight, rtol=0, atol=1e-6)
        assert not restored._forward_hooks and not restored._forward_pre_hooks or finish == "delete"


def test_disabled_adapter_runs_the_pretrained_layer():
    reference = TwoLayerNet()
    model = get_peft_model(copy.deepcopy(reference), DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL))
    model.base_model.set_step(TOTAL)
    x = torch.randn(3, 24)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), reference(x), atol=1e-3)


def test_saved_svd_adapter_reloads_on_a_fresh_base(tmp_path):
    config = DecayLoraConfig(r=4, target_modules=["query", "value"], total_steps=TOTAL, modules_to_save=["classifier"])
    model = get_peft_model(tiny_bert(), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "decaylora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.base_model.set_step(40)
    model.eval()
    tokens = torch.randint(0, 64, (2, 9))
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_activation_aware_split_is_saved_so_a_mid_run_checkpoint_reloads_exactly(tmp_path):
    """A split fitted to data cannot be derived from W on loading, so its top part travels with the adapter."""
    torch.manual_seed(0)
    config = DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL, noise="vanish")
    reference = TwoLayerNet()
    model = get_peft_model(copy.deepcopy(reference), config)
    inputs = torch.randn(64, 24) @ torch.diag(torch.logspace(0, -2, 24))
    initialize_from_activations(model, [inputs])
    model.base_model.set_step(TOTAL // 2)  # d = 0.5: half of the residual still counts
    model.eval()
    expected = model(inputs)
    model.save_pretrained(tmp_path / "calibrated")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "calibrated").eval()
    torch.testing.assert_close(loaded(inputs), expected, rtol=1e-5, atol=1e-5)
    layer, loaded_layer = model.base_model.model.lin0, loaded.base_model.model.lin0
    # the noise matches the residual of the saved split
    assert loaded_layer.decaylora_uniform_noise["default"] == pytest.approx(layer.decaylora_uniform_noise["default"],
                                                                            rel=1e-5)
    # a full state dict (as a Trainer checkpoint of the whole model) loads into a fresh adapter the same way
    fresh = get_peft_model(copy.deepcopy(reference), config).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.unload().lin0.weight, reference.lin0.weight, rtol=0, atol=1e-6)
    # the plain split is derived from W again, so it is not saved
    get_peft_model(copy.deepcopy(reference), config).save_pretrained(tmp_path / "plain")
    saved = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "calibrated")}
    assert not any("top" in key for key in saved["plain"])
    assert {key for key in saved["calibrated"] if "top" in key} == {"base_model.model.lin0.decaylora_top_left",
                                                                   "base_model.model.lin0.decaylora_top_right"}


def test_a_second_adapter_next_to_an_svd_one_is_refused_and_changes_nothing():
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], total_steps=TOTAL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lin1.*init_weights=True"):
        model.add_adapter("other", DecayLoraConfig(r=2, target_modules=["lin1"], total_steps=TOTAL, init_weights=True))
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


TOKENS, LABELS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])


def distilled_bert(**config_overrides):
    """A 2-layer BERT adapted with random B (so the student differs from the teacher) at step 60 (d = 0.375)."""
    config = DecayLoraConfig(r=4, target_modules=["query", "value", "dense"], total_steps=TOTAL,
                             modules_to_save=["classifier"], distillation="hidden_states", init_weights=False,
                             **config_overrides)
    model = get_peft_model(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), config)
    model.base_model.set_step(60)
    return model


@torch.no_grad()
def teacher_and_plain_outputs(model):
    """The pretrained network's hidden states, and the training-mode outputs of the student without distillation."""
    with model.disable_adapter():
        model.eval()
        teacher = model(input_ids=TOKENS, output_hidden_states=True).hidden_states
    model.train()
    model.base_model.peft_config["default"].distillation = "off"
    plain = model(input_ids=TOKENS, labels=LABELS, output_hidden_states=True)
    model.base_model.peft_config["default"].distillation = "hidden_states"
    return teacher, plain


def test_hidden_state_distillation_adds_the_teacher_term():
    model = distilled_bert(distillation_weight=2.0, distillation_layers=None)
    teacher, plain = teacher_and_plain_outputs(model)
    with torch.no_grad():
        distilled = model(input_ids=TOKENS, labels=LABELS)
        model.base_model.peft_config["default"].distillation_schedule = "decay"
        faded = model(input_ids=TOKENS, labels=LABELS)
    term = hidden_state_distillation_loss(plain.hidden_states, teacher)
    assert term > 1e-3
    torch.testing.assert_close(distilled.loss, plain.loss + 2.0 * term)
    torch.testing.assert_close(faded.loss, plain.loss + 2.0 * 0.375 * term)  # the weight fades with d
    assert distilled.hidden_states is None  # not asked for, not returned
    model.eval()  # no teacher outside training
    assert torch.equal(model(input_ids=TOKENS, labels=LABELS).loss, model(input_ids=TOKENS, labels=LABELS).loss)


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean()


@pytest.mark.parametrize("layers, picked", [([-1], [2]), ([0], [1]), ([0, -1], [1, 2]), (None, [1, 2])])
def test_distillation_layers_pick_the_distilled_hidden_states(layers, picked):
    model = distilled_bert(distillation_weight=3.0, distillation_layers=layers)
    teacher, plain = teacher_and_plain_outputs(model)
    with torch.no_grad():
        distilled = model(input_ids=TOKENS, labels=LABELS)
    # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1]
    errors = [relative_error(plain.hidden_states[i], teacher[i]) for i in (1, 2)]
    assert abs(errors[0] - errors[1]) > 0.1 * max(errors)  # the layers differ, so picking the wrong one shows
    expected = torch.stack([errors[i - 1] for i in picked]).mean()
    torch.testing.assert_close(distilled.loss, plain.loss + 3.0 * expected)


def test_distillation_layers_beyond_the_model_name_the_field_and_the_layer_count():
    config = DecayLoraConfig(r=4, target_modules=["query"], total_steps=TOTAL, distillation="hidden_states",
                             distillation_layers=[2])
    model = get_peft_model(tiny_bert(), config).train()
    with pytest.raises(ValueError, match=r"`distillation_layers` \[2\].*has 2 layers"):
        model(input_ids=torch.randint(0, 64, (2, 5)), labels=torch.tensor([0, 1]))


def test_auto_distillation_only_for_transformers_models_with_labels():
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL))
    model.train()
    model(torch.randn(2, 24)).sum().backward()  # a plain module: no teacher, no error
    strict = DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL, distillation="hidden_states")
    model = get_peft_model(TwoLayerNet(), strict).train()
    with pytest.raises(ValueError, match="transformers model .* called with `labels`"):
        model(torch.randn(2, 24))


def test_distillation_hooks_leave_with_the_adapter():
    model = get_peft_model(tiny_bert(), DecayLoraConfig(r=4, target_modules=["query"], total_steps=TOTAL))
    inner = model.base_model.model
    assert inner._forward_hooks and inner._forward_pre_hooks
    merged = model.merge_and_unload()
    assert not merged._forward_hooks and not merged._forward_pre_hooks


@pytest.mark.parametrize(
    "kwargs, field",
    [({"init_weights": "pissa"}, "init_weights"), ({"distillation": "logits"}, "distillation"),
     ({"distillation_weight": -1.0}, "distillation_weight"), ({"distillation_weight": True}, "distillation_weight"),
     ({"distillation_schedule": "cosine"}, "distillation_schedule"),
     ({"distillation_layers": []}, "distillation_layers"), ({"distillation_layers": [True]}, "distillation_layers"),
     ({"distillation_layers": "last"}, "distillation_layers")],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DecayLoraConfig(target_modules=["query"], **kwargs)


def test_activation_aware_init_is_the_best_rank_r_fit_on_the_calibration_inputs():
    torch.manual_seed(0)
    base = TwoLayerNet()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, DecayLoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], total_steps=TOTAL))
    plain = copy.deepcopy(model)
    inputs = torch.randn(256, 24) @ torch.diag(torch.logspace(0, -2, 24))  # anisotropic, as real activations are
    initialize_from_activations(model, [inputs[:128], (inputs[128:],)])
    torch.testing.assert_close(model(inputs), reference(inputs), rtol=1e-5, atol=1e-5)  # W is still split exactly
    W = reference.lin0.weight.detach()

    def error(peft_model):  # how far the starting s B A is from W on the calibration inputs
        return torch.linalg.matrix_norm((peft_model.base_model.model.lin0.get_delta_weight("default") - W) @ inputs.T)

    singular_values = torch.linalg.svdvals(W @ inputs.T)
    best = singular_values[4:].square().sum().sqrt()  # Eckart-Young: no rank-4 W' does better on these inputs
    assert error(model).item() == pytest.approx(best.item(), rel=1e-3)
    assert error(model) < 0.8 * error(plain)  # the plain SVD of W fits the outputs clearly worse


def test_activation_aware_init_gives_the_noise_the_statistics_of_the_new_residual():
    """The residual that decays changes with the calibration, and the noise must match the new one."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], total_steps=TOTAL,
                                                          noise="keep"))
    layer = model.base_model.model.lin0
    plain_residual = layer.get_base_layer().weight.detach().clone()
    initialize_from_activations(model, [torch.randn(256, 24) @ torch.diag(torch.logspace(0, -2, 24))])
    base = layer.get_base_layer()
    residual = base.weight.detach()
    assert residual.var().item() > 1.2 * plain_residual.var().item()  # so matching the old residual would fail
    model.base_model.set_step(TOTAL // 2)
    d, scale = layer.schedule_point("default")
    noise = torch.stack([layer._frozen_weight_builder(base, "default", d, scale, seed)() - d * residual
                         for seed in range(400)])
    assert noise.mean().item() == pytest.approx((1 - d) * residual.mean().item(), abs=0.01 * residual.std().item())
    assert noise.var(unbiased=False).item() == pytest.approx((1 - d**2) * residual.var(unbiased=False).item(), rel=0.03)


def test_activation_aware_init_with_fewer_calibration_rows_than_inputs_keeps_the_model():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(512, 32))
    model = get_peft_model(copy.deepcopy(reference), DecayLoraConfig(r=4, target_modules=["0"], total_steps=TOTAL))
    inputs = torch.nn.functional.gelu(torch.randn(64, 512) * 3 + 1)  # a singular second moment, as from few tokens
    initialize_from_activations(model, [inputs])
    torch.testing.assert_close(model(inputs), reference(inputs), rtol=1e-4, atol=1e-4)
    assert model.base_model.model[0].decaylora_A["default"].weight.isfinite().all()


def test_activation_aware_init_of_fused_slices_keeps_the_model_and_trains():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16)).eval()
    reference = copy.deepcopy(gpt2)
    config = DecayLoraConfig(r=2, target_modules=["c_attn", "c_fc"], total_steps=TOTAL,
                             fused_enable={"c_attn": [True, False, True]}, distillation="off")
    model = get_peft_model(gpt2, config)
    tokens = torch.randint(0, 50, (4, 8))
    initialize_from_activations(model, [{"input_ids": tokens, "labels": tokens}])
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-5)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert torch.equal(layer.get_base_layer().weight.T[24:48], reference.transformer.h[0].attn.c_attn.weight.T[24:48])
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert layer.decaylora_A["default"].weight.grad.abs().sum() > 0


def test_activation_aware_init_refuses_what_it_cannot_refine_and_changes_nothing():
    x = torch.randn(3, 24)
    zeros = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0"], init_weights=True))
    with pytest.raises(ValueError, match="init_weights='svd'"):
        initialize_from_activations(zeros, [x])
    model = get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], total_steps=TOTAL))
    model.base_model.set_step(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has not started training"):
        initialize_from_activations(model, [x])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), DecayLoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="linear layer"):
        initialize_from_activations(conv, [torch.randn(1, 3, 5, 5)])
