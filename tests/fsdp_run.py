"""DecayLoRA training runs, sharded with FSDP2 (``fully_shard`` on every block and the root) when launched on several
processes, else plain: ``torchrun --nproc_per_node 2 tests/fsdp_run.py --out DIR`` against ``python tests/fsdp_run.py
--out DIR``. Used by tests/test_fsdp.py. Every rank reads the same global batches and trains on its slice of each.

Each scenario (``--scenarios``, names in SCENARIOS) writes to ``DIR/<name>/``: ``run.pt`` (losses averaged over ranks,
every rank's schedule at every step, the full adapter state gathered at the end, the logits of the model compressed
from it, the peak bytes of a step in the decay, the bytes of parameters and buffers each rank holds) and the adapter
saved with ``save_pretrained`` in ``adapter/``. ``--resume name:k`` stops that scenario after step ``k`` with a
sharded checkpoint (torch.distributed.checkpoint), builds everything anew and resumes from it, as a restarted job.
"""

from __future__ import annotations

import argparse
import math
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_decaylora  # noqa: E402

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LINEARS = ["query", "key", "value", "dense"]
GLOBAL_BATCH, LENGTH, VOCAB = 4, 12, 64
# the default DecayLoraConfig but for its targets, run length and noise; "calibrate": the SVD split fitted to
# activations after sharding (initialize_from_activations); "callback": the schedule driven by DecayLoraCallback's
# hooks as the Trainer calls them, the run length taken from its max_steps; "memory": a larger model, its peak step
# memory measured
SCENARIOS = {
    "llama": dict(model="llama", calibrate=True),
    "llama-callback": dict(model="llama", driver="callback"),
    "bert": dict(model="bert"),
    "llama-noise": dict(model="llama", noise="vanish"),
    "memory-lora": dict(model="llama", method="lora", hidden=256, layers=4, measure_memory=True),
    "memory-decaylora": dict(model="llama", noise="vanish", hidden=256, layers=4, measure_memory=True),
}
DEFAULTS = dict(model="llama", method="decaylora", noise="off", calibrate=False, hidden=32, layers=2,
                measure_memory=False, steps=10, lr=1e-2, resume_at=0, driver="attach_schedule")


def build(args, method="decaylora"):
    """The tiny random model, its adapter, and the layers to shard (each transformer block, then the root)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                                             num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32))
        targets, blocks = LLAMA_LINEARS, lambda m: m.base_model.model.model.layers
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                                         num_attention_heads=4, intermediate_size=args.hidden * 2,
                                                         max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0))  # dropout draws differ by world size
        targets, blocks = BERT_LINEARS, lambda m: m.base_model.model.bert.encoder.layer
    if method == "base":  # no adapter
        return model, blocks
    if method == "lora":
        config = LoraConfig(r=8, target_modules=targets)
    else:  # the defaults, but for the targets, the run length, the noise and a decay to step 9 of 10, which keeps
        # "vanish" noise on for steps 2-6 (the memory scenario measures steps 4-6; DeepSpeed's refusal, step 5)
        total_steps = None if args.driver == "callback" else args.steps  # the callback takes the Trainer's
        config = peft_decaylora.DecayLoraConfig(target_modules=targets, total_steps=total_steps, noise=args.noise,
                                                decay_end=0.9)
    return get_peft_model(model, config), blocks


def batch(args, step, rank, world):
    """This rank's slice of the global batch of ``step`` (the same on every rank and every world size)."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    labels = ids if args.model == "llama" else torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return {"input_ids": ids[rows], "labels": labels[rows]}


def shard(model, blocks, world):
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model, world):
    """The whole model's state dict, gathered from the shards (every rank gets it)."""
    if world == 1:
        return {key: value.detach().clone() for key, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def checkpoint(model, optimizer, directory, world, load=False):
    """A sharded checkpoint of model and optimizer (torch.distributed.checkpoint), or ``torch.save`` on one process."""
    if world == 1:
        path = Path(directory) / "state.pt"
        if load:
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        else:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if load:
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        dcp.save(state, checkpoint_id=directory)


def peak_bytes(profiler) -> int:
    """Bytes allocated above the start at the peak of the profiled code, from the CPU allocator's events in time order
    (the event tree torch.profiler's memory timeline is built from)."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((node.start_time_ns, node.extra_fields.alloc_size)
                    for node in walk(profiler.profiler.kineto_results.experimental_event_tree())
                    if node.tag == _EventType.Allocation)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def measured(on: bool):
    if not on:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield profiler


def resident_bytes(model) -> int:
    """Bytes of the parameters and buffers this rank holds (its shards of the sharded ones)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *model.buffers()]]
    return sum(t.numel() * t.element_size() for t in tensors)


def train(args, rank, world, out: Path):
    model, blocks = build(args, args.method)
    model = shard(model, blocks, world)
    if args.calibrate:  # the same batches on every rank, as DecayLoraCallback(calibration_batches=...) samples them
        peft_decaylora.initialize_from_activations(model, [{"input_ids": batch(args, -1 - i, 0, 1)["input_ids"]}
                                                           for i in range(2)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    callback = trainer_state = None
    if args.driver == "callback":
        from transformers import TrainerControl, TrainerState, TrainingArguments

        callback, control = peft_decaylora.DecayLoraCallback(), TrainerControl()
        trainer_args = TrainingArguments(output_dir=str(out), max_steps=args.steps, report_to=[])
        trainer_state = TrainerState(max_steps=args.steps)
        callback.on_train_begin(trainer_args, trainer_state, control, model=model)
    elif args.method == "decaylora":
        peft_decaylora.attach_schedule(model, optimizer)
    losses, schedules, first, peak = [], [], 0, None
    stop = args.resume_at or args.steps
    for restart in ([False, True] if args.resume_at else [False]):
        if restart:  # a new job: everything built anew, then the checkpoint loaded
            model, blocks = build(args, args.method)
            model = shard(model, blocks, world)  # (the split comes from the checkpoint)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
            peft_decaylora.attach_schedule(model, optimizer)
            checkpoint(model, optimizer, str(out / "checkpoint"), world, load=True)
            first, stop = args.resume_at, args.steps
        model.train()
        for step in range(first, stop):
            if args.method == "decaylora":
                state = model.base_model.schedule_state()
                everyone = [None] * world
                if world > 1:
                    dist.all_gather_object(everyone, state)
                else:
                    everyone = [state]
                schedules.append(everyone)
            # in the decay, the least of 3 steps' peaks (other threads' allocations only add to one)
            with measured(args.measure_memory and 4 <= step <= 6) as profiler:
                loss = model(**batch(args, step, rank, world)).loss
                loss.backward()
            if profiler is not None:
                peak = min(peak or math.inf, peak_bytes(profiler))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if callback is not None:  # as Trainer does after each optimizer step
                trainer_state.global_step += 1
                callback.on_step_end(trainer_args, trainer_state, control, model=model)
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            losses.append(loss.item())
        if args.resume_at and not restart:
            checkpoint(model, optimizer, str(out / "checkpoint"), world)
    state = full_state(model, world)
    adapter = {key: value for key, value in state.items() if "decaylora_" in key or "lora_" in key}
    result = {"losses": losses, "schedules": schedules, "adapter": adapter, "peak_step_bytes": peak,
              "resident_bytes": resident_bytes(model),
              "whole_bytes": sum(t.numel() * t.element_size() for t in state.values())}
    if args.method == "decaylora":
        reference, _ = build(args)  # unsharded, from the gathered adapter: what a user compresses after training
        reference.load_state_dict(state)
        reference.base_model.set_total_steps(args.steps)  # as the saved config carries it
        if world == 1:
            model.save_pretrained(str(out / "adapter"))
        else:  # the shards gathered, as Trainer and Accelerate do for a sharded PEFT model
            model.save_pretrained(str(out / "adapter"), state_dict=adapter, is_main_process=rank == 0)
        compressed = reference.compress_and_unload().eval()
        with torch.no_grad():
            result["compressed_logits"] = compressed(**{k: v for k, v in batch(args, 0, 0, 1).items()
                                                        if k != "labels"}).logits
    if rank == 0:
        torch.save(result, out / "run.pt")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="llama,bert,llama-noise", help=f"of {list(SCENARIOS)}")
    parser.add_argument("--resume", default="", help="name:step,... to checkpoint and resume at that step")
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    resume = {name: int(step) for name, step in (item.split(":") for item in options.resume.split(",") if item)}
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    try:
        for name in options.scenarios.split(","):
            args = argparse.Namespace(**{**DEFAULTS, **SCENARIOS[name], "resume_at": resume.get(name, 0)})
            out = Path(options.out) / name
            out.mkdir(parents=True, exist_ok=True)
            train(args, rank, world, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
