"""DecayLoRA through PEFT's and transformers' public API: registration, save/load in a fresh process, adapters."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file

from peft_decaylora import DecayLoraConfig, DecayLoraModel
from tests.conftest import tiny_bert

REPO = Path(__file__).resolve().parents[1]


def test_registration_extends_peft():
    assert PeftType.DECAYLORA == "DECAYLORA" and PeftType("DECAYLORA") is PeftType["DECAYLORA"]
    assert PeftType.DECAYLORA in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.DECAYLORA] is DecayLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DECAYLORA] is DecayLoraModel


def test_print_trainable_parameters_counts_A_B_C(capsys, bert):
    model = get_peft_model(bert, DecayLoraConfig(r=4, target_modules=["query", "value"]))
    trainable, _ = model.get_nb_trainable_parameters()
    # 2 layers x 2 modules x (A: 4x32 + B: 32x4 + C: 32)
    assert trainable == 4 * (4 * 32 + 32 * 4 + 32)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_several_adapters(bert, tokens):
    model = get_peft_model(bert, DecayLoraConfig(r=4, target_modules=["query", "value"], total_steps=10,
                                                 init_weights=False))
    model.add_adapter("other", DecayLoraConfig(r=2, target_modules=["query"], total_steps=20, init_weights=False))
    model.base_model.set_step(10, adapter_name="default")
    model.eval()
    out_default = model(tokens).logits
    model.set_adapter("other")
    assert model.base_model.schedule_state()["step"] == 0  # each adapter has its own schedule
    assert not model.base_model.model.bert.encoder.layer[0].attention.self.query.decaylora_A["default"].requires_grad
    out_other = model(tokens).logits
    assert not torch.allclose(out_default, out_other)
    with pytest.raises(ValueError, match="one active adapter"):
        model.base_model.set_adapter(["default", "other"])
    model.set_adapter("default")
    torch.testing.assert_close(model(tokens).logits, out_default)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(tokens).logits, out_default)


def test_safe_merge_and_unload_is_all_or_nothing(bert, tokens):
    model = get_peft_model(bert, DecayLoraConfig(r=4, target_modules=["query", "value"], total_steps=10,
                                                 init_weights=False))
    model.base_model.set_step(5)
    model.eval()
    expected = model(tokens).logits
    last = model.base_model.model.bert.encoder.layer[1].attention.self.value
    with torch.no_grad():
        last.decaylora_A["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        last.decaylora_A["default"][0, 0] = 0.0
    assert not any(getattr(m, "merged", False) for m in model.modules())
    merged = model.merge_and_unload(safe_merge=True)
    assert not torch.allclose(merged(tokens).logits, expected)  # A changed: the merge used the repaired weights
    assert "DecayLora" not in repr(merged)


ROUND_TRIP = textwrap.dedent(
    """
    import importlib, json, sys, torch
    import peft_decaylora
    importlib.reload(peft_decaylora)  # importing again must not register twice
    from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, PeftType
    from transformers import AutoModelForSequenceClassification
    base_dir, adapter_dir, io_path = sys.argv[1:4]
    tokens, expected = torch.load(io_path)
    results = {"config": type(PeftConfig.from_pretrained(adapter_dir)).__name__, "peft_type": PeftType.DECAYLORA.value}
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval()
    results["peft_model"] = (model(tokens).logits - expected).abs().max().item()
    results["state"] = model.base_model.schedule_state()
    auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    results["auto"] = (auto(tokens).logits - expected).abs().max().item()
    plain = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    plain.load_adapter(adapter_dir)
    results["load_adapter"] = (plain(tokens).logits - expected).abs().max().item()
    print(json.dumps(results))
    """
)


def test_save_and_load_in_a_fresh_process_after_importing_twice(tmp_path, tokens):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    config = DecayLoraConfig(r=4, target_modules=["query", "value"], total_steps=100, decay_end=0.5,
                             init_weights=False, modules_to_save=["classifier"], noise="keep")
    model = get_peft_model(base, config)
    model.base_model.set_step(35)  # d = 0.375
    model.eval()
    expected = model(tokens).logits
    model.save_pretrained(tmp_path / "adapter")
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "DECAYLORA" and saved_config["total_steps"] == 100
    saved_config["base_model_name_or_path"] = str(tmp_path / "base")  # for AutoPeftModel
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved_config))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    steps = [v.item() for k, v in weights.items() if k.endswith("decaylora_step")]
    assert steps == [35] * 4
    assert not any("base_layer" in k for k in weights)  # frozen weights are not in the adapter
    torch.save((tokens, expected), tmp_path / "io.pt")
    (tmp_path / "round_trip.py").write_text(ROUND_TRIP)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "round_trip.py"), str(tmp_path / "base"), str(tmp_path / "adapter"),
         str(tmp_path / "io.pt")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["config"] == "DecayLoraConfig" and results["peft_type"] == "DECAYLORA"
    assert results["state"]["step"] == 35 and results["state"]["decay_factor"] == pytest.approx(0.375)
    for loader in ("peft_model", "auto", "load_adapter"):
        assert results[loader] < 1e-5, loader
