import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_decaylora import DecayLoraConfig, DecayLoraModule
from tests.conftest import tiny_bert


def test_defaults():
    # the original specification's start and end value; the measured best of BENCHMARKS.md for the end of the decay,
    # noise, initialisation and distillation
    config = DecayLoraConfig(target_modules=["query"])
    assert (config.decay_start, config.decay_end, config.min_decay) == (0.1, "auto", 0.0)
    assert (config.noise, config.noise_threshold, config.noise_stats) == ("off", 0.3, "tensor")
    assert (config.init_weights, config.distillation, config.distillation_weight) == ("svd", "auto", 3.0)
    assert config.distillation_layers == [-1]
    assert config.bias_compensation is True and config.total_steps is None
    assert config.peft_type == "DECAYLORA"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"decay_start": 0.9, "decay_end": 0.1}, "decay_start"),
        ({"decay_start": 50, "decay_end": 10}, "decay_start"),
        ({"decay_start": 1.5}, "decay_start"),
        ({"decay_end": -1}, "decay_end"),
        ({"decay_end": "late"}, "decay_end"),
        ({"decay_start": 0.5, "decay_end": 20, "total_steps": 100}, "decay_start"),
        ({"min_decay": 1.5}, "min_decay"),
        ({"min_decay": -0.1}, "min_decay"),
        ({"noise": "loud"}, "noise"),
        ({"noise_threshold": 1.2}, "noise_threshold"),
        ({"decay_shape": "exponential"}, "decay_shape"),
        ({"noise_stats": "row"}, "noise_stats"),
        ({"total_steps": 0}, "total_steps"),
        ({"noise_seed": 1.5}, "noise_seed"),
        ({"bias_compensation": "yes"}, "bias_compensation"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"query": -1}}, "alpha_pattern"),
        ({"rank_by_depth": 1.5}, "rank_by_depth"),
        ({"rank_by_depth": "down"}, "rank_by_depth"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"`{field}"):
        DecayLoraConfig(target_modules=["query"], **kwargs)


@pytest.mark.parametrize("make_model, target, decay_end", [
    (tiny_bert, "query", 0.9),  # a transformers model other than a causal LM (those: tests/test_causal_lm.py)
    (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "0", 0.5),  # any other model
])
def test_auto_decay_end_is_filled_in_by_kind_of_model_and_saved_as_that_number(make_model, target, decay_end,
                                                                                tmp_path):
    model = get_peft_model(make_model(), DecayLoraConfig(target_modules=[target], total_steps=10))
    assert model.peft_config["default"].decay_end == decay_end
    model.base_model.set_step(round(10 * decay_end) - 1)
    assert model.base_model.schedule_state()["decay_factor"] > 0.0
    model.base_model.set_step(round(10 * decay_end))
    assert model.base_model.schedule_state()["decay_factor"] == 0.0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["decay_end"] == decay_end


@pytest.mark.parametrize("layers", [[-1], None, [0, 2]])
def test_distillation_layers_survive_save_and_load(tmp_path, layers):
    DecayLoraConfig(target_modules=["query"], distillation_layers=layers).save_pretrained(tmp_path)
    assert DecayLoraConfig.from_pretrained(tmp_path).distillation_layers == layers


def test_config_saved_before_newer_fields_keeps_its_meaning(tmp_path):
    DecayLoraConfig(target_modules=["query"], rank_by_depth=-0.5).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved.pop("distillation_layers") == [-1] and saved.pop("rank_by_depth") == -0.5
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = DecayLoraConfig.from_pretrained(tmp_path)
    assert loaded.distillation_layers is None and loaded.rank_by_depth == 0.0  # every layer; the same rank everywhere


def test_target_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"not_a_module.*can adapt.*\['classifier', 'dense', 'key', 'query', 'value'\]"):
        get_peft_model(tiny_bert(), DecayLoraConfig(target_modules=["not_a_module"]))


def test_unsupported_target_names_it_and_leaves_model_unchanged():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError) as error:
        get_peft_model(model, DecayLoraConfig(target_modules=["query", "word_embeddings"]))
    message = str(error.value)
    assert "bert.embeddings.word_embeddings" in message and "Embedding" in message
    assert "torch.nn.Linear" in message  # lists what is supported
    assert [n for n, _ in model.named_modules()] == names_before
    assert not any(isinstance(m, DecayLoraModule) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grouped_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    with pytest.raises(TypeError, match=r"0 .*groups=4"):
        get_peft_model(model, DecayLoraConfig(target_modules=["0", "1"]))
    assert not any(isinstance(m, DecayLoraModule) for m in model.modules())


def test_rank_by_depth_moves_rank_down_the_stack_at_the_same_total(tmp_path):
    config = DecayLoraConfig(r=8, lora_alpha=16, target_modules=["query", "dense"], rank_by_depth=-0.5,
                             rank_pattern={"layer.3.attention.output.dense": 5})
    model = get_peft_model(tiny_bert(num_hidden_layers=4), config)
    bert = model.base_model.model.bert
    # layer i of 4 gets round(8 * (1 - 0.5 * (2 i / 3 - 1))): 12, 9, 7, 4 -- the 32 of rank 8 in each layer
    assert [layer.attention.self.query.r["default"] for layer in bert.encoder.layer] == [12, 9, 7, 4]
    assert {layer.attention.self.query.scaling["default"] for layer in bert.encoder.layer} == {2.0}
    assert bert.encoder.layer[0].attention.self.query.decaylora_A["default"].shape == (12, 32)
    assert bert.encoder.layer[3].attention.output.dense.r["default"] == 5  # rank_pattern wins
    assert bert.pooler.dense.r["default"] == 8  # outside the layer stack
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(num_hidden_layers=4), tmp_path)
    inputs = torch.randint(0, 64, (2, 7))
    assert torch.equal(loaded(input_ids=inputs).logits, model.eval()(input_ids=inputs).logits)


def test_rank_and_alpha_patterns():
    model = get_peft_model(
        tiny_bert(),
        DecayLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                        alpha_pattern={"value": 6}),
    )
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    assert layer.query.r["default"] == 4 and layer.query.scaling["default"] == 2.0
    assert layer.value.r["default"] == 2 and layer.value.scaling["default"] == 3.0
    assert layer.value.decaylora_A["default"].shape == (2, 32)


def test_keep_fraction_gives_each_layer_the_rank_that_keeps_that_share_of_its_parameters(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import TwoLayerNet

    config = DecayLoraConfig(lora_alpha=8, target_modules=["lin0", "lin1"], keep_fraction=0.5, total_steps=10)
    model = get_peft_model(TwoLayerNet(), config)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    # r (in + out) = 0.5 in out: lin0 24 -> 40: 7.5 -> 8; lin1 40 -> 16: 5.7 -> 6
    assert (lin0.r["default"], lin1.r["default"]) == (8, 6)
    assert lin0.scaling["default"] == lin1.scaling["default"] == 1.0  # lora_alpha / r of the config
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["keep_fraction"] == 0.5
    loaded = PeftModel.from_pretrained(TwoLayerNet(), tmp_path)
    assert loaded.base_model.model.lin1.r["default"] == 6
    model.base_model.set_step(10)
    compressed = model.compress_and_unload()
    kept = sum(p.numel() for name, p in compressed.named_parameters() if "weight" in name)
    assert kept == 8 * (24 + 40) + 6 * (40 + 16)  # about half of 24 * 40 + 40 * 16
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=4, n_positions=16))
    fused = get_peft_model(gpt2, DecayLoraConfig(target_modules=["c_attn"], keep_fraction=0.5,
                                                 fused_enable={"c_attn": [True, False, True]}))
    # the adapted q and v slices share one rank: r (2 x (24 + 24)) = 0.5 x 24 x 48 -> 6
    assert fused.base_model.model.transformer.h[0].attn.c_attn.r["default"] == 6


@pytest.mark.parametrize("value", [0, 0.0, -0.2, 1.5, True, "0.8"])
def test_keep_fraction_outside_0_to_1_names_the_field(value):
    with pytest.raises(ValueError, match=r"`keep_fraction` must be a number in \(0, 1\]"):
        DecayLoraConfig(target_modules=["q"], keep_fraction=value)
