"""The SVD initialisation (the residual of W decays) and the hidden-state distillation from the pretrained network."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from peft_decaylora import DecayLoraConfig, initialize_from_activations
from peft_decaylora.distillation import hidden_state_distillation_loss

from conftest import TwoLayerNet, tiny_bert

TOTAL = 100


def top_r(weight: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).reshape(weight.shape)


def test_svd_init_starts_at_the_top_r_part_and_fades_it_out_with_w():
    base = TwoLayerNet()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, DecayLoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], total_steps=TOTAL))
    x = torch.randn(5, 24)
    assert torch.equal(model(x), reference(x))
    for name in ("lin0", "lin1"):
        layer, original = getattr(model.base_model.model, name), getattr(reference, name).weight
        assert torch.equal(layer.get_base_layer().weight, original)  # W itself is never changed
        # s B A, what the layer keeps at d = 0, is the top-r part of W; at d = 1 the adapter adds nothing
        torch.testing.assert_close(layer.get_delta_weight("default", decay=0.0), top_r(original, 4), rtol=1e-4,
                                   atol=1e-5)
        assert torch.equal(layer.get_delta_weight("default", decay=1.0), torch.zeros_like(original))
    model.base_model.set_step(30)  # d = 0.5: halfway from W to its top part
    lin0 = model.base_model.model.lin0
    W, top = reference.lin0.weight, top_r(reference.lin0.weight, 4)
    torch.testing.assert_close(lin0(x), x @ (0.5 * W + 0.5 * top).T + 0.5 * reference.lin0.bias, rtol=1e-4,
                               atol=1e-5)
    model.base_model.set_step(TOTAL)  # d = 0: the adapter alone is the top-r approximation
    torch.testing.assert_close(lin0(x), x @ top.T, rtol=1e-4, atol=1e-5)


def test_svd_init_of_conv_and_fused_slices():
    conv = nn.Conv2d(6, 10, 3, padding=1)
    model = get_peft_model(nn.Sequential(copy.deepcopy(conv)), DecayLoraConfig(r=3, target_modules=["0"],
                                                                               total_steps=TOTAL))
    torch.testing.assert_close(model.base_model.model[0].get_delta_weight("default", decay=0.0), top_r(conv.weight, 3),
                               rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16)).eval()
    W = gpt2.transformer.h[0].attn.c_attn.weight.T.detach().clone()
    config = DecayLoraConfig(r=2, target_modules=["c_attn"], total_steps=TOTAL, fused_enable={"c_attn": [True, False, True]})
    model = get_peft_model(gpt2, config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    expected = torch.cat([top_r(W[:24], 2), torch.zeros(24, 24), top_r(W[48:], 2)])  # each adapted slice its own
    torch.testing.assert_close(layer.get_delta_weight("default", decay=0.0), expected, rtol=1e-4, atol=1e-5)


def test_activation_aware_split_is_saved_so_a_mid_run_checkpoint_reloads_exactly(tmp_path):
    """A split fitted to data cannot be derived from W on loading: it travels with the adapter as B0."""
    torch.manual_seed(0)
    config = DecayLoraConfig(r=4, target_modules=["lin0"], total_steps=TOTAL, noise="vanish")
    reference = TwoLayerNet()
    model = get_peft_model(copy.deepcopy(reference), config)
    inputs = torch.randn(64, 24) @ torch.diag(torch.logspace(0, -2, 24))
    initialize_from_activations(model, [inputs])
    model.base_model.set_step(TOTAL // 2)  # d = 0.5: half of the top part still fades
    model.eval()
    expected = model(inputs)
    model.save_pretrained(tmp_path)
    assert "base_model.model.lin0.decaylora_B0" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert torch.equal(loaded(inputs), expected)
    fresh = get_peft_model(copy.deepcopy(reference), config).eval()  # a full state dict, as a Trainer checkpoint
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(inputs), expected)


TOKENS, LABELS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])


def distilled_bert(**config_overrides):
    """A 2-layer BERT adapted with random B (so the student differs from the teacher) at step 35 (d = 0.375)."""
    config = DecayLoraConfig(r=4, target_modules=["query", "value", "dense"], total_steps=TOTAL, decay_end=0.5,
                             modules_to_save=["classifier"], distillation="hidden_states", init_weights=False,
                             **config_overrides)
    model = get_peft_model(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), config)
    model.base_model.set_step(35)
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
    model.eval()  # no teacher outside training: the loss is the model's own
    with torch.no_grad():
        evaluated = model(input_ids=TOKENS, labels=LABELS).loss
        model.base_model.peft_config["default"].distillation = "off"
        assert torch.equal(model(input_ids=TOKENS, labels=LABELS).loss, evaluated)


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
    [({"init_weights": "pissa"}, "init_weights"), ({"distillation": "kl"}, "distillation"),
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
    assert torch.equal(model(inputs), reference(inputs))  # the model did not change
    W = reference.lin0.weight.detach()

    def error(peft_model):  # how far the starting s B A is from W on the calibration inputs
        top = peft_model.base_model.model.lin0.get_delta_weight("default", decay=0.0)
        return torch.linalg.matrix_norm((top - W) @ inputs.T)

    singular_values = torch.linalg.svdvals(W @ inputs.T)
    best = singular_values[4:].square().sum().sqrt()  # Eckart-Young: no rank-4 W' does better on these inputs
    assert error(model).item() == pytest.approx(best.item(), rel=1e-3)
    assert error(model) < 0.8 * error(plain)  # the plain SVD of W fits the outputs clearly worse


@pytest.mark.parametrize("make_conv", [
    lambda: nn.Conv2d(3, 10, 3, stride=2, padding=1),
    lambda: nn.Conv2d(3, 10, (3, 1), padding="same", dilation=2, padding_mode="reflect", bias=False),
    lambda: nn.Conv2d(12, 10, 1),
], ids=["strided", "same-reflect", "pointwise"])
def test_activation_aware_init_of_a_convolution_is_the_best_rank_r_fit_on_its_input_patches(make_conv):
    torch.manual_seed(0)
    conv = make_conv()
    reference = nn.Sequential(copy.deepcopy(conv))
    model = get_peft_model(nn.Sequential(conv), DecayLoraConfig(r=2, target_modules=["0"], total_steps=TOTAL))
    plain = copy.deepcopy(model)
    # channels of very different scale, and a smooth image, so the patch statistics are far from isotropic
    images = torch.randn(8, conv.in_channels, 9, 9).cumsum(-1) * torch.logspace(0, -2, conv.in_channels)[:, None, None]
    initialize_from_activations(model, [images])
    torch.testing.assert_close(model(images), reference(images))  # the model did not change

    def output_error(peft_model):  # how far the starting rank-2 convolution is from the original on these images
        layer = peft_model.base_model.model[0]
        kernel = layer.get_delta_weight("default", decay=0.0)
        return torch.linalg.vector_norm(layer.get_base_layer()._conv_forward(images, conv.weight - kernel, None))

    # Eckart-Young on the unfolded patches: no rank-2 kernel reproduces the outputs better
    patches = torch.nn.functional.unfold(torch.nn.functional.pad(
        images, conv._reversed_padding_repeated_twice, mode="constant" if conv.padding_mode == "zeros" else
        conv.padding_mode), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    outputs = conv.weight.detach().flatten(1) @ patches.transpose(0, 1).flatten(1)
    best = torch.linalg.svdvals(outputs)[2:].square().sum().sqrt()
    assert output_error(model).item() == pytest.approx(best.item(), rel=1e-3)
    assert output_error(model) < 0.8 * output_error(plain)


def test_activation_aware_init_with_fewer_calibration_rows_than_inputs_keeps_the_model():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(512, 32))
    model = get_peft_model(copy.deepcopy(reference), DecayLoraConfig(r=4, target_modules=["0"], total_steps=TOTAL))
    inputs = torch.nn.functional.gelu(torch.randn(64, 512) * 3 + 1)  # a singular second moment, as from few tokens
    initialize_from_activations(model, [inputs])
    torch.testing.assert_close(model(inputs), reference(inputs), rtol=1e-4, atol=1e-4)
    assert model.base_model.model[0].decaylora_A["default"].isfinite().all()


def test_activation_aware_init_of_fused_slices_keeps_the_model_and_trains():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16)).eval()
    reference = copy.deepcopy(gpt2)
    config = DecayLoraConfig(r=2, target_modules=["c_attn", "c_fc"], total_steps=TOTAL,
                             fused_enable={"c_attn": [True, False, True]}, distillation="off")
    model = get_peft_model(gpt2, config)
    tokens = torch.randint(0, 50, (4, 8))
    initialize_from_activations(model, [{"input_ids": tokens, "labels": tokens}])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert layer.decaylora_B["default"].grad.abs().sum() > 0  # at d = 1 B learns first (A once B moves)


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
