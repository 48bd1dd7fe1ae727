"""FSDP2: DecayLoRA sharded with ``fully_shard`` on 2 CPU processes (gloo) trains as one process on the same global
batch, through the decay, the noise and d = 0; resumes from a sharded checkpoint; saves and compresses the same
adapter; holds only its shard of the frozen weights. The runs are tests/fsdp_run.py's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RUN = Path(__file__).with_name("fsdp_run.py")
COMPARED = ["llama", "bert", "llama-noise", "llama-callback"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def launch(out: Path, processes: int, *arguments: str) -> None:
    command = [sys.executable, str(RUN), "--out", str(out), *arguments]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, and 2 ranks sharded (llama-noise checkpointed after step 5 and resumed in a new job)."""
    root = tmp_path_factory.mktemp("fsdp")
    launch(root / "one", 1, "--scenarios", ",".join(COMPARED))
    launch(root / "two", 2, "--scenarios", ",".join(COMPARED + ["memory-lora", "memory-decaylora"]),
           "--resume", "llama-noise:5")
    return root


def result(runs, world, scenario):
    return torch.load(runs / world / scenario / "run.pt", weights_only=False)


@pytest.mark.parametrize("scenario", COMPARED)
def test_two_ranks_train_as_one_process(runs, scenario):
    one, two = result(runs, "one", scenario), result(runs, "two", scenario)
    assert len(two["losses"]) == 10
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    assert one["adapter"].keys() == two["adapter"].keys()
    for key, value in one["adapter"].items():
        torch.testing.assert_close(two["adapter"][key], value, rtol=1e-4, atol=5e-5, msg=key)
    trained = max(value.abs().max() for key, value in two["adapter"].items() if ".decaylora_B." in key)
    assert trained > 1e-2  # B starts at 0: the adapters moved far beyond the tolerance


@pytest.mark.parametrize("scenario", COMPARED)
def test_ranks_agree_on_the_schedule_through_the_decay(runs, scenario):
    schedules = result(runs, "two", scenario)["schedules"]
    assert all(rank_states[0] == rank_states[1] for rank_states in schedules)
    assert [states[0] for states in schedules] == [states[0] for states in result(runs, "one", scenario)["schedules"]]
    decays = [states[0]["decay_factor"] for states in schedules]
    assert decays[0] == 1.0 and decays[-1] == 0.0 and decays == sorted(decays, reverse=True)
    if scenario == "llama-noise":
        assert any(states[0]["noise_active"] for states in schedules)


def test_callback_advances_the_schedule_as_attach_schedule(runs):
    """DecayLoraCallback, given the run length by the Trainer's max_steps, steps the schedule as attach_schedule."""
    callback, attached = (result(runs, "two", name)["schedules"] for name in ("llama-callback", "llama"))
    assert len(callback) == 10 and callback == attached


def test_noise_changes_the_run(runs):
    """The noise scenario draws noise (otherwise it would test nothing beyond the default)."""
    noisy, plain = result(runs, "one", "llama-noise")["losses"], result(runs, "one", "llama")["losses"]
    assert max(abs(a - b) for a, b in zip(noisy, plain)) > 1e-4


def test_adapter_saved_from_the_shards_matches_the_unsharded_one(runs):
    for scenario in COMPARED:
        one, two = runs / "one" / scenario / "adapter", runs / "two" / scenario / "adapter"
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        config_one, config_two = (json.loads((d / "adapter_config.json").read_text()) for d in (one, two))
        for config in (config_one, config_two):  # PEFT saves the set of targets in the process's hash order
            config["target_modules"] = sorted(config["target_modules"])
        assert config_one == config_two
        tensors_one, tensors_two = (load_file(d / "adapter_model.safetensors") for d in (one, two))
        assert tensors_one.keys() == tensors_two.keys()
        for key, value in tensors_one.items():
            torch.testing.assert_close(tensors_two[key], value, rtol=1e-4, atol=5e-5, msg=key)


def test_model_compressed_after_sharded_training_matches(runs):
    for scenario in COMPARED:
        torch.testing.assert_close(result(runs, "two", scenario)["compressed_logits"],
                                   result(runs, "one", scenario)["compressed_logits"], rtol=1e-4, atol=1e-5)


def test_each_rank_holds_half_of_the_weights(runs):
    """FSDP2 shards parameters, not buffers: the SVD start B0 is a parameter, the noise statistics are per row."""
    for scenario in ["llama-noise", "memory-decaylora"]:
        run = result(runs, "two", scenario)
        assert run["resident_bytes"] <= 0.52 * run["whole_bytes"]


def test_peak_step_memory_stays_near_lora(runs):
    """A step in the decay, with noise drawn, peaks near LoRA's under the same FSDP2 layout: holding the frozen
    weights unsharded (or the noisy weights until backward) would add all of them."""
    lora, decaylora = result(runs, "two", "memory-lora"), result(runs, "two", "memory-decaylora")
    frozen_bytes = lora["whole_bytes"] - sum(v.numel() * v.element_size() for v in lora["adapter"].values())
    assert all(states[0]["noise_active"] for states in decaylora["schedules"][4:7])  # the steps measured
    assert decaylora["peak_step_bytes"] - lora["peak_step_bytes"] < 0.25 * frozen_bytes


@pytest.mark.slow
def test_fsdp_example_on_smollm2_saves_an_adapter_that_compresses_to_its_saved_model(tmp_path):
    """The README's launch command, shortened: 2 ranks train SmolLM2-135M; the adapter saved from the gathered shards
    loads unsharded, and compresses to the model the example saved."""
    assets = pytest.importorskip("examples.assets")
    try:
        assets.smollm2_gguf(None), assets.load_tv_dialogue
    except assets.AssetNotFoundError as error:
        pytest.skip(str(error))
    from peft import PeftModel

    from peft_decaylora import load_compressed

    example = RUN.parents[1] / "examples" / "fsdp_causal_lm.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
               "--steps", "4", "--block-size", "64", "--calibration-blocks", "2", "--eval-blocks", "2",
               "--output-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "DecayLoRA 20% compressed" in done.stdout
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["total_steps"] == 4 and config["keep_fraction"] == 0.8

    sys.path.insert(0, str(example.parent))
    try:
        from causal_lm_accelerate import load_model_and_tokenizer
    finally:
        sys.path.remove(str(example.parent))
    base, _ = load_model_and_tokenizer(None)
    dense_parameters = sum(p.numel() for p in base.parameters())
    from_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).compress_and_unload().eval()
    saved = load_compressed(tmp_path / "compressed")
    ids = torch.arange(100, 132).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, from_adapter(input_ids=ids).logits)
    assert sum(p.numel() for p in saved.parameters()) < 0.9 * dense_parameters
