"""DecayLoRA trained under DeepSpeed ZeRO-3 (``deepspeed.initialize``, CPU accelerator, gloo):
``torchrun --nproc_per_node 2 tests/deepspeed_run.py --out DIR``, set up as tests/fsdp_run.py's scenarios (the same
models, batches and optimizer), so that tests/test_deepspeed.py compares it with fsdp_run.py's one-process run.
Writes ``DIR/<scenario>/run.pt`` (losses, schedules, the gathered adapter) and ``DIR/refused.json`` (the errors of
what is known not to work under ZeRO-3, each with whether the model stayed unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_run  # noqa: E402

import peft_decaylora  # noqa: E402

SCENARIOS = ["llama", "bert"]  # the default config; noise is refused under ZeRO-3


def zero3_config(world: int) -> dict:
    return {"train_batch_size": fsdp_run.GLOBAL_BATCH, "train_micro_batch_size_per_gpu": fsdp_run.GLOBAL_BATCH // world,
            "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0}  # as the reference run: DeepSpeed clips at 1.0 unless told


def train(args, rank, world, out: Path) -> None:
    import deepspeed

    model, _ = fsdp_run.build(args)
    if args.calibrate:  # before ZeRO-3 partitions the weights, on the same batches as fsdp_run.py's
        peft_decaylora.initialize_from_activations(model, [{"input_ids": fsdp_run.batch(args, -1 - i, 0, 1)["input_ids"]}
                                                           for i in range(2)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config(world))
    peft_decaylora.attach_schedule(engine, optimizer)  # the torch optimizer DeepSpeed steps
    losses, schedules = [], []
    for step in range(args.steps):
        everyone = [None] * world
        dist.all_gather_object(everyone, engine.module.base_model.schedule_state())
        schedules.append(everyone)
        loss = engine(**fsdp_run.batch(args, step, rank, world)).loss
        engine.backward(loss)
        engine.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        adapter = {key: value.clone() for key, value in model.state_dict().items() if "decaylora_" in key}
    if rank == 0:
        torch.save({"losses": losses, "schedules": schedules, "adapter": adapter}, out / "run.pt")


def refusals(rank, world) -> dict:
    """What raises under ZeRO-3, and whether the model was left as it was."""
    import deepspeed
    from peft import get_peft_model

    args = argparse.Namespace(**{**fsdp_run.DEFAULTS, **fsdp_run.SCENARIOS["llama"]})
    found = {}
    with deepspeed.zero.Init(config_dict_or_path=zero3_config(world)):  # partitioned as it is built
        model, _ = fsdp_run.build(args, method="base")
    try:
        get_peft_model(model, peft_decaylora.DecayLoraConfig(target_modules=fsdp_run.LLAMA_LINEARS))
    except TypeError as error:
        found["add adapter to a zero.Init model"] = {"error": str(error), "unchanged": not any(
            "decaylora" in name for name, _ in model.named_modules())}
    for noise in ("off", "vanish"):
        model, _ = fsdp_run.build(argparse.Namespace(**{**vars(args), "noise": noise}))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad]), config=zero3_config(world))
        engine.module.base_model.set_step(5)  # in the decay, with the noise on
        batches = [{"input_ids": fsdp_run.batch(args, 0, 0, 1)["input_ids"]}]
        calls = {"initialize_from_activations": lambda: peft_decaylora.initialize_from_activations(
            engine.module, batches), "merge_adapter": lambda: engine.module.merge_adapter()} if noise == "off" else {
            "training forward with noise": lambda: engine(**fsdp_run.batch(args, 5, rank, world))}
        for name, call in calls.items():
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                before = {key: value.clone() for key, value in model.state_dict().items()}
            try:
                call()
            except RuntimeError as error:
                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    unchanged = all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
                found[name] = {"error": str(error), "unchanged": unchanged}
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    import deepspeed

    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for name in SCENARIOS:
            args = argparse.Namespace(**{**fsdp_run.DEFAULTS, **fsdp_run.SCENARIOS[name]})
            out = Path(options.out) / name
            out.mkdir(parents=True, exist_ok=True)
            train(args, rank, world, out)
        found = refusals(rank, world)
        if rank == 0:
            (Path(options.out) / "refused.json").write_text(json.dumps(found, indent=1))
        # leave together: one rank tearing down while the other still writes once aborted a CI run (SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # every result is written and both ranks have left the group; the interpreter's own teardown (C++ destructors of
    # DeepSpeed's CPU communication op) sometimes aborts a rank under load ("terminate called without an active
    # exception", SIGABRT), which failed CI runs whose results were all there: leave without it
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
