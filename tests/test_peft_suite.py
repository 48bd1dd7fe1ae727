"""PEFT's own generic adapter tests (``tests/test_custom_models.py::TestPeftCustomModel`` of the installed peft's
source distribution) run on DecayLoRA cases, with the default ``init_weights="svd"`` and with ``init_weights=True``.

The source distribution is fetched at test time with ``pip download`` and cached; without a package registry the
module is skipped with a message. PEFT's test code is read from there, never copied into this repository.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft
import pytest

from peft_decaylora import DecayLoraConfig

pytestmark = pytest.mark.peft_suite  # its own pytest run (`pytest -m peft_suite`), which .ci/run adds
CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"

# The one list of what DecayLoRA does not run of PEFT's tests: test -> (the cases it skips, why).
AT_D0 = "d=0"
EXEMPT = {
    "test_active_adapter": ("", "several adapters active at once: DecayLoRA refuses them with a clear error, since each "
                            "adapter decays the shared frozen weight (PEFT exempts AdaLoRA alike); "
                            "tests/test_contract.py checks the error"),
    "test_disable_adapters": (AT_D0, "it asserts that a fresh adapter computes what the base model does; with d = 0 "
                              "from the first step the layer is the compressed one, s B A x + C, by design"),
    "test_disable_adapters_with_merging": (AT_D0, "as test_disable_adapters"),
    "test_only_params_are_updated": (f"{AT_D0} init B=0", "with B = 0 and d = 0 the layer outputs exactly C = 0, so "
                                     "the ReLU after it passes no gradient and nothing can train"),
}

# The DecayLoRA cases: PEFT's small custom models, each in warm-up (d = 1) and with d = 0 from the first step, with the
# library's default initialisation (SVD) and the original specification's (B = 0).
MODELS = {
    "MLP 1": ("MLP", {"target_modules": ["lin0"]}),
    "MLP 2": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "MLP modules_to_save": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "MLP channel noise keep": ("MLP", {"target_modules": ["lin0", "lin1"], "noise": "keep", "noise_stats": "channel"}),
    "MLP no C": ("MLP", {"target_modules": ["lin0"], "bias_compensation": False}),
    "GPT-2 Conv1D": ("EmbConv1D", {"target_modules": ["conv1d"]}),
    "Conv2d": ("Conv2d", {"target_modules": ["conv2d"]}),
}
PHASES = {"warm-up": {"total_steps": 100}, "d=0": {"decay_start": 0, "decay_end": 0}}
INITS = {"svd": {}, "B=0": {"init_weights": True}}
CASES = [(f"DecayLoRA {model} {phase} init {init}", model_id, DecayLoraConfig,
          {"r": 2, "lora_alpha": 2, **kwargs, **phase_kwargs, **init_kwargs})
         for model, (model_id, kwargs) in MODELS.items() for phase, phase_kwargs in PHASES.items()
         for init, init_kwargs in INITS.items()]


def peft_tests_directory() -> Path:
    """``tests/`` of the installed peft's sdist, downloaded once into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft-decaylora"
    target = cache / f"peft-{peft.__version__}-tests"
    if (target / "test_custom_models.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"peft=={peft.__version__}", "--dest", download]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        archives = list(Path(download).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not archives:
            pytest.skip(f"PEFT's generic tests need the sdist of peft=={peft.__version__} from a package registry, "
                        f"which `pip download` could not fetch: {result.stderr.strip()[-300:]}",
                        allow_module_level=True)
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
            for member in members:
                member.name = "/".join(member.name.split("/")[2:])
            archive.extractall(target, members=members, filter="data")
    return target


def import_peft_tests():
    """PEFT's ``test_custom_models`` as a module of a package of its own (its imports are relative)."""
    spec = importlib.util.spec_from_loader("peft_upstream_tests", loader=None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(peft_tests_directory())]
    sys.modules["peft_upstream_tests"] = package
    return importlib.import_module("peft_upstream_tests.test_custom_models")


def on_decaylora_cases(test):
    """``test`` with PEFT's case list swapped for DecayLoRA's, its other parametrisations kept."""

    @functools.wraps(test)
    def run(self, *args, **kwargs):
        return test(self, *args, **kwargs)

    exempt_cases, reason = EXEMPT.get(test.__name__, (None, None))
    cases = [pytest.param(*case, id=case[0], marks=[pytest.mark.skip(reason=reason)] if exempt_cases is not None
                          and exempt_cases in case[0] else []) for case in CASES]
    marks = [mark for mark in getattr(test, "pytestmark", [])
             if not (mark.name == "parametrize" and mark.args[0] == CASE_ARGS)]
    run.pytestmark = marks + [pytest.mark.parametrize(CASE_ARGS, cases).mark]
    return run


upstream = import_peft_tests().TestPeftCustomModel
case_tests = {name: test for name, test in vars(upstream).items() if name.startswith("test_") and any(
    mark.name == "parametrize" and mark.args[0] == CASE_ARGS for mark in getattr(test, "pytestmark", []))}
# the tests that take the case list run on DecayLoRA's; the others are about other PEFT methods
TestPeftCustomModelOnDecayLora = type(
    "TestPeftCustomModelOnDecayLora", (upstream,),
    {name: on_decaylora_cases(case_tests[name]) if name in case_tests else None for name in dir(upstream)
     if name.startswith("test_")},
)
del upstream
