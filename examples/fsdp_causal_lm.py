"""DecayLoRA sharded with FSDP2: every block linear of SmolLM2-135M fine-tuned on TV dialogue and compressed by 20%,
the model split across processes with ``fully_shard``.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_causal_lm.py        # 2 CPU processes (gloo), 11 min
    torchrun --standalone --nproc_per_node 8 examples/fsdp_causal_lm.py --model HuggingFaceTB/SmolLM2-1.7B  # GPUs

Offline by default, from the assets of ``examples/causal_lm_accelerate.py`` (``bash .ci/install-assets``). On GPUs
each process takes its own device and NCCL; on CPU, gloo. The recipe is the one-process example's (lr 2e-4,
the library's ``decay_end``, 0.3 for a causal LM, the split fitted to training blocks); what changes under sharding:

1. every process loads the model and adds the adapter, then each transformer block and the root are ``fully_shard``-ed;
2. ``initialize_from_activations`` runs after sharding, on the same batches on every process;
3. ``attach_schedule`` advances the decay per optimizer step, the same on every process; each trains on its slice of
   every global batch;
4. at the end the full state is gathered on process 0, which saves the adapter with ``save_pretrained``, loads it into
   an unsharded model, compresses it and compares held-out perplexity with the dense model.

The default 40 steps are a demonstration of the launch, too few for the quality of ``causal_lm_accelerate.py``:
on 2 idle CPU cores (677 s wall time) it printed held-out perplexity 37.48 dense, 39.85 compressed by 20%.
docs/sharded_training.md says what is tested under FSDP2 and DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see causal_lm_accelerate.py: shared CPU cores

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from causal_lm_accelerate import BLOCK_LINEARS, blocks, load_model_and_tokenizer, perplexity  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DecayLoRA + FSDP2 on SmolLM2-135M (offline by default); launch with "
                                            "torchrun.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hub name or local path instead of the packaged GGUF.")
    p.add_argument("--reduction", type=float, default=0.2, help="Share of the block linears' parameters removed.")
    p.add_argument("--block-size", type=int, default=256, help="Tokens per training sequence.")
    p.add_argument("--global-batch", type=int, default=4, help="Sequences per optimizer step, over all processes.")
    p.add_argument("--steps", type=int, default=40, help="Optimizer steps.")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--decay-end", type=float, default=None,
                   help="Share of the steps after which W is gone (default: the library's, 0.3 for a causal LM).")
    p.add_argument("--calibration-blocks", type=int, default=16, help="Training blocks the split is fitted to.")
    p.add_argument("--eval-blocks", type=int, default=16, help="Held-out blocks for perplexity.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/fsdp_causal_lm")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from peft import PeftModel, get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from assets import load_tv_dialogue
    from peft_decaylora import DecayLoraConfig, attach_schedule, initialize_from_activations, save_compressed

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the {world} processes.")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    base, tokenizer = load_model_and_tokenizer(args.model)
    dialogue = load_tv_dialogue(seed=args.seed)
    train_blocks = blocks(dialogue["train"]["text"], tokenizer, args.block_size)
    config = DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=1.0 - args.reduction,
                             **({} if args.decay_end is None else {"decay_end": args.decay_end}))
    model = get_peft_model(base, config).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.base_model.model.model.layers:  # each transformer block, then the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    calibration = train_blocks[-args.calibration_blocks:].to(device)
    initialize_from_activations(model, [{"input_ids": b} for b in calibration.split(4)])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    attach_schedule(model, optimizer, total_steps=args.steps)
    order = torch.randperm(len(train_blocks) - args.calibration_blocks,
                           generator=torch.Generator().manual_seed(args.seed))  # the same on every process
    per_rank = args.global_batch // world
    model.train()
    for step in range(args.steps):
        rows = order[(step * args.global_batch + rank * per_rank) % len(order):][:per_rank]
        batch = train_blocks[rows].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        if rank == 0 and (step % 5 == 4 or step == args.steps - 1):
            schedule = model.base_model.schedule_state()
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  d {schedule['decay_factor']:.3f}",
                  flush=True)

    # gathered on process 0 only (cpu_offload), which saves, reloads unsharded and compresses
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        adapter_dir = os.path.join(args.output_dir, "adapter")
        model.save_pretrained(adapter_dir, state_dict=state)
        dense, _ = load_model_and_tokenizer(args.model)
        eval_blocks = blocks(dialogue["test"]["text"], tokenizer, args.block_size)[: args.eval_blocks]
        dense_perplexity = perplexity(dense, eval_blocks)
        compressed = PeftModel.from_pretrained(dense, adapter_dir).compress_and_unload()
        compressed_dir = save_compressed(compressed, os.path.join(args.output_dir, "compressed"), tokenizer=tokenizer)
        print(f"held-out perplexity ({len(eval_blocks)} blocks of unseen episodes): dense {dense_perplexity:.2f}, "
              f"DecayLoRA {args.reduction:.0%} compressed {perplexity(compressed, eval_blocks):.2f}")
        print(f"{world} processes, {args.steps} steps of {args.global_batch} x {args.block_size} tokens; adapter in "
              f"{adapter_dir}, compressed model in {compressed_dir}; wall time {time.perf_counter() - start:.0f} s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
