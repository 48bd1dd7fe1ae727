"""DeepSpeed ZeRO-3 (CPU accelerator, gloo, 2 processes): the default DecayLoRA config trains as one plain process on
the same global batch, and what is known not to work raises a clear error with the model unchanged. The runs are
tests/deepspeed_run.py's, the reference tests/fsdp_run.py's. Skipped where DeepSpeed is not installed (`.ci/run`
installs it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# not imported here: DeepSpeed patches torch on import, and the runs happen in their own processes
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (see .ci/run for how CI installs it)")

TESTS = Path(__file__).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run(*command: str) -> None:
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    # DeepSpeed compiles its CPU communication op on first use: once here, not by both ranks at once
    run("-c", "from deepspeed.accelerator import get_accelerator; "
              "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    run(str(TESTS / "fsdp_run.py"), "--out", str(root / "one"), "--scenarios", "llama,bert")
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TESTS / "deepspeed_run.py"),
        "--out", str(root / "zero3"))
    return root


@pytest.mark.parametrize("scenario", ["llama", "bert"])
def test_zero3_trains_as_one_process(runs, scenario):
    one, zero3 = (torch.load(runs / world / scenario / "run.pt", weights_only=False) for world in ("one", "zero3"))
    torch.testing.assert_close(torch.tensor(zero3["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    assert zero3["adapter"].keys() == one["adapter"].keys()
    for key, value in one["adapter"].items():
        torch.testing.assert_close(zero3["adapter"][key], value, rtol=1e-4, atol=5e-5, msg=key)
    assert max(value.abs().max() for key, value in zero3["adapter"].items() if ".decaylora_B." in key) > 1e-2
    decays = [states[0]["decay_factor"] for states in zero3["schedules"]]
    assert all(states[0] == states[1] for states in zero3["schedules"])
    assert decays[0] == 1.0 and decays[-1] == 0.0


def test_what_zero3_cannot_do_raises_and_leaves_the_model_unchanged(runs):
    refused = json.loads((runs / "zero3" / "refused.json").read_text())
    expected = {"add adapter to a zero.Init model": "zero3_init_flag: false",
                "initialize_from_activations": "before `deepspeed.initialize`",
                "merge_adapter": "deepspeed.zero.GatheredParameters",
                "training forward with noise": "noise='off'"}
    assert refused.keys() == expected.keys()
    for name, advice in expected.items():
        assert advice in refused[name]["error"], name
        assert refused[name]["unchanged"], name
