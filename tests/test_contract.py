"""The adapter contract as one table, as PEFT's test_custom_models.py has it: every layer type x initialisation x
schedule phase, for step 0, merge and unmerge, save and load, disable, delete, and compression; then what several
adapters on the same layers must do."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.save_and_load import get_base_model_state_dict
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from peft_decaylora import CompressedLayer, CompressionError, DecayLoraConfig
from tests.conftest import TwoLayerNet

TOTAL = 100  # the default schedule: d = 1 up to step 10, d(30) = 0.5, d = 0 from step 50


class SmallCNN(nn.Module):
    """Full convolutions with stride, dilation, reflect padding, no bias, a non-square kernel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=2, dilation=2, padding_mode="reflect", bias=False)
        self.conv3 = nn.Conv2d(6, 5, (1, 3), padding=(0, 1))

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))).mean((2, 3))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def neox():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4)
    return GPTNeoXForCausalLM(config).eval()


def logits(model, x):
    return model(x).logits


def plain(model, x):
    return model(x)


TOKENS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
# layer type -> (base model, DecayLoRA config, input, output of a forward)
LAYERS = {
    "Linear": (TwoLayerNet, {"target_modules": ["lin0", "lin1"]}, torch.randn(5, 24), plain),
    "Conv1D": (gpt2, {"target_modules": ["c_fc", "c_proj"]}, TOKENS, logits),
    "Conv2d": (SmallCNN, {"target_modules": ["conv1", "conv2", "conv3"]}, torch.randn(2, 3, 12, 12), plain),
    "fused": (gpt2, {"target_modules": ["c_attn"]}, TOKENS, logits),
    "fused, a slice kept": (neox, {"target_modules": ["query_key_value"],
                                   "fused_enable": {"query_key_value": [True, False, True]}}, TOKENS, logits),
}
INITS = ["svd", True, False]
# phase -> (step, config), with W gone at half the run (pinned: "auto" differs for the GPT-2 models)
PHASES = {"warm-up": (5, {}), "decay": (30, {}), "noise": (30, {"noise": "vanish"}), "d=0": (TOTAL, {})}


def build(layer_type, init, phase, r=2):
    """The base model, and a DecayLoRA model of it at the phase's step, its adapter moved off its start as training
    would (so that every test sees an adapter that changes the output)."""
    make_base, config, x, run = LAYERS[layer_type]
    step, phase_config = PHASES[phase]
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), DecayLoraConfig(r=r, total_steps=TOTAL, decay_end=0.5,
                                                                 init_weights=init, **config, **phase_config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "decaylora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.base_model.set_step(step)
    return base, model.eval(), x, run


TABLE = [pytest.param(t, i, p, id=f"{t}-{i}-{p}") for t in LAYERS for i in INITS for p in PHASES]


def assert_same_weights(model, base):
    """``model`` (a PeftModel: its base model's state) holds ``base``'s weights, bit for bit."""
    state = get_base_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    assert state.keys() == base.state_dict().keys()
    for name, value in base.state_dict().items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("layer_type", LAYERS)
@pytest.mark.parametrize("init", ["svd", True])
def test_step_zero_is_the_base_model_bit_for_bit(layer_type, init):
    make_base, config, x, run = LAYERS[layer_type]
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), DecayLoraConfig(r=2, total_steps=TOTAL, init_weights=init, **config))
    for mode in ("train", "eval"):  # d = 1 in training too: no decay, no noise
        getattr(model, mode)()
        with torch.no_grad():
            assert torch.equal(run(model, x), run(base.eval(), x))


@pytest.mark.parametrize("layer_type, init, phase", TABLE)
def test_merged_is_eval_and_unmerge_is_exact(layer_type, init, phase):
    base, model, x, run = build(layer_type, init, phase)
    with torch.no_grad():
        expected = run(model, x)
        model.base_model.merge_adapter()
        torch.testing.assert_close(run(model, x), expected, rtol=1e-4, atol=1e-5)
        model.base_model.unmerge_adapter()
    assert_same_weights(model, base)
    unloaded = copy.deepcopy(model).merge_and_unload()
    assert not any("decaylora" in name for name in unloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(run(unloaded, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_type, init, phase", TABLE)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_give_the_same_model(layer_type, init, phase, low_cpu_mem_usage, tmp_path):
    base, model, x, run = build(layer_type, init, phase)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert loaded.base_model.schedule_state() == model.base_model.schedule_state()
    saved, reloaded = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(run(loaded, x), run(model, x))


@pytest.mark.parametrize("layer_type, init, phase", TABLE)
def test_disable_delete_and_unload_give_back_the_base_model_bit_for_bit(layer_type, init, phase):
    base, model, x, run = build(layer_type, init, phase)
    with torch.no_grad():
        expected, adapted = run(base.eval(), x), run(model, x)
        assert not torch.allclose(adapted, expected)
        with model.disable_adapter():
            assert torch.equal(run(model, x), expected)
        assert torch.equal(run(model, x), adapted)
    assert_same_weights(model, base)
    unloaded = copy.deepcopy(model).unload()
    assert_same_weights(unloaded, base)
    model.delete_adapter("default")
    with torch.no_grad():
        assert torch.equal(run(model.base_model.model, x), expected)


@pytest.mark.parametrize("layer_type, init, phase", TABLE)
def test_compression_keeps_the_eval_outputs_once_w_is_gone(layer_type, init, phase):
    base, model, x, run = build(layer_type, init, phase)
    with torch.no_grad():
        expected = run(model, x)
    if phase != "d=0":
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CompressionError, match="Nothing was changed"):
            model.compress_and_unload()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    compressed = model.compress_and_unload()
    layers = [m for m in compressed.modules() if isinstance(m, CompressedLayer)]
    assert layers and not any("decaylora" in name for name in compressed.state_dict())
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(compressed, x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- several adapters
def two_svd_adapters():
    """TwoLayerNet with two SVD-initialised adapters of different ranks on the same layers, each trained apart."""
    base = TwoLayerNet()
    config = dict(target_modules=["lin0", "lin1"], total_steps=TOTAL)
    model = get_peft_model(copy.deepcopy(base), DecayLoraConfig(r=4, **config))
    model.add_adapter("other", DecayLoraConfig(r=2, **config))
    for name, step in (("default", 30), ("other", 95)):
        model.set_adapter(name)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if parameter.requires_grad and "decaylora_" in key:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        model.base_model.set_step(step)
    return base, model.eval()


def test_several_svd_adapters_each_give_exactly_their_own_outputs():
    base, model = two_svd_adapters()
    x = torch.randn(6, 24)
    with torch.no_grad():
        outputs = {}
        for name in ("other", "default"):
            model.set_adapter(name)
            outputs[name] = model(x)
        assert not torch.allclose(outputs["default"], outputs["other"])
        for name in ("other", "default", "other", "default"):  # back and forth
            model.set_adapter(name)
            assert torch.equal(model(x), outputs[name])
            assert model.base_model.schedule_state()["step"] == {"default": 30, "other": 95}[name]
        assert_same_weights(model, base)
        with model.disable_adapter():
            assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("active", ["default", "other"])
def test_deleting_an_svd_adapter_leaves_the_other_exactly(active):
    base, model = two_svd_adapters()
    x = torch.randn(6, 24)
    model.set_adapter("default")
    with torch.no_grad():
        expected = model(x)
    model.set_adapter(active)
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.delete_adapter("default")
    assert_same_weights(model, base)


def test_several_svd_adapters_load_from_disk_beside_each_other(tmp_path):
    base, model = two_svd_adapters()
    x = torch.randn(6, 24)
    model.save_pretrained(tmp_path)  # "other" goes to tmp_path / "other"
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            expected[name] = model(x)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    result = loaded.load_adapter(tmp_path / "other", adapter_name="other", low_cpu_mem_usage=True)
    assert result.missing_keys == []
    loaded.eval()
    for name in ("other", "default"):
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected[name])


def test_several_active_adapters_are_refused_and_change_nothing():
    _, model = two_svd_adapters()
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="one active adapter at a time"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["other"]
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_quantised_base_layer_is_refused_by_name_and_changes_nothing():
    base = TwoLayerNet()
    base.lin1.weight = nn.Parameter(torch.zeros(16, 40, dtype=torch.int8), requires_grad=False)  # as bitsandbytes
    with pytest.raises(TypeError, match=r"lin1 .*quantised torch.int8 weight.*The model was not changed"):
        get_peft_model(base, DecayLoraConfig(r=2, target_modules=["lin0", "lin1"]))
    assert type(base.lin0) is nn.Linear and type(base.lin1) is nn.Linear
