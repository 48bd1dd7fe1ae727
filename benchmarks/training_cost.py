"""Training cost of DecayLoRA against PEFT's LoRA: step time and memory held for backward, per schedule phase.

Same model (all-MiniLM-L6-v2, offline), same rank, targets, batch and process; the two models take turns
(interleaved rounds) and the median step (forward, backward, AdamW step) is reported as a ratio to LoRA. Memory is
the peak allocated GPU memory on CUDA; on CPU, where PyTorch keeps no allocator statistics, it is the bytes of the
tensors autograd saves for backward (what a training step holds beyond the weights), counted once per storage,
parameters excluded. The operator columns count the operators a step runs that would each launch a kernel on a GPU
(views, allocations and host reads excluded): where a small model's step is bound by kernel launches, as MiniLM's
is on a large GPU, the step time follows that count rather than the arithmetic.

The layer's forward keeps three shortcuts, each measured here in the default configuration: it skips the frozen
product at ``d = 0`` (the ``d=0`` row: 0.42x LoRA's step), the SVD start's addition ``B + (1 - d) B0`` at ``d = 1``
and the scaling by ``s`` when ``s = 1``. On the host-bound proxy, where a step costs its operators, the last two
save 37 of a warm-up step's 695 operators and 74 in every phase (of 732 in warm-up), measured with each removed
in turn; their step times move within the proxy's run-to-run spread of about 5%.

``--host-bound`` runs a proxy for a launch-bound GPU on the CPU: MiniLM's architecture (the same layers, modules
and adapters) shrunk to width 16 with random weights, one 8-token example, one thread. The arithmetic then costs
next to nothing, so a step costs what the host spends dispatching it, which is what bounds MiniLM's step on a large
GPU. AdamW is the fused one there: on the CPU the multi-tensor (foreach) AdamW loops over its tensors one by one,
which CUDA's multi-tensor kernels do not.

    python benchmarks/training_cost.py                  # CPU, writes the table into BENCHMARKS.md
    python benchmarks/training_cost.py --host-bound     # the host-bound proxy on the CPU
    python benchmarks/training_cost.py --device cuda    # GPU rows
    python benchmarks/training_cost.py --device cuda --batch 256 --max-length 128   # GPU, bound by arithmetic
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification

import peft_decaylora  # noqa: F401
from common import MINILM_TARGETS, load_minilm, markdown_table, median_time, report, text_batch
from peft_decaylora import DecayLoraConfig

TOTAL = 100
DEFAULT_BATCH = (32, 64)  # examples x tokens
PHASES = {"warm-up (d=1)": 0, "decay + noise (d=0.5)": 50, "decay, no noise (d=0.2)": 80, "d=0": 100}


def saved_bytes(step_fn, model) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step_fn``, parameters excluded (they
    are resident anyway; a saved *derived* weight, such as DecayLoRA's noisy weight, counts)."""
    resident = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in resident:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step_fn()
    return sum(storages.values())


class KernelCount(TorchDispatchMode):
    """Counts the operators that compute (launch a kernel on a GPU): not views, allocations or scalar reads."""

    NOT_KERNELS = {"empty", "empty_like", "empty_strided", "_unsafe_view", "lift_fresh", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and not func.is_view and name not in self.NOT_KERNELS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def kernels_per_step(step_fn) -> int:
    with KernelCount() as counter:
        step_fn()
    return counter.count


def peak_cuda_bytes(step_fn, model) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step_fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub name instead of the packaged all-MiniLM-L6-v2")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH[0])
    parser.add_argument("--max-length", type=int, default=DEFAULT_BATCH[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="steps per model per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="a csv (text, label/category) instead of the packaged corpus")
    parser.add_argument("--distillation", action="store_true",
                        help="DecayLoRA with distillation='hidden_states' (one extra teacher forward per step)")
    parser.add_argument("--host-bound", action="store_true",
                        help="the host-bound proxy: MiniLM's architecture at width 16, random weights, batch 1 x 8 "
                             "tokens, one thread, fused AdamW (see above)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = parser.parse_args()

    base, tokenizer = load_minilm(args.model)
    if args.host_bound:
        if args.device != "cpu":
            parser.error("--host-bound is a CPU proxy for a launch-bound GPU; on a GPU, measure the GPU itself")
        torch.set_num_threads(1)
        args.batch, args.max_length = 1, 8
        args.rounds, args.repeats = max(args.rounds, 15), max(args.repeats, 10)
        base = shrunk(base)
    batch = {k: v.to(args.device) for k, v in text_batch(tokenizer, args.batch, args.max_length, source=args.data).items()}
    batch["labels"] = torch.arange(args.batch, device=args.device) % 2
    common = dict(r=args.r, lora_alpha=args.r, target_modules=MINILM_TARGETS, modules_to_save=["classifier"])
    models = {
        "LoRA": get_peft_model(copy.deepcopy(base), LoraConfig(**common)),
        "DecayLoRA": get_peft_model(copy.deepcopy(base), DecayLoraConfig(
            total_steps=TOTAL, noise="vanish", distillation="hidden_states" if args.distillation else "off", **common)),
    }
    optimizers = {}
    for name, model in models.items():
        model.to(args.device).train()
        # foreach: the multi-tensor AdamW that CUDA uses by default, on CPU too, so the operator counts agree; the
        # proxy's fused AdamW costs the host per tensor about what CUDA's multi-tensor kernels do
        multi_tensor = {"fused": True} if args.host_bound else {"foreach": True}
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                             **multi_tensor)

    def step(name):
        def run():
            loss = models[name](**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return run

    for name in models:  # warm-up: kernels, allocator, optimizer state
        for _ in range(2):
            step(name)()

    memory = peak_cuda_bytes if args.device == "cuda" else saved_bytes
    memory_label = "peak GPU memory" if args.device == "cuda" else "saved for backward"
    rows = []
    for phase, position in PHASES.items():
        models["DecayLoRA"].base_model.set_step(position)
        times = {name: [] for name in models}
        for _ in range(args.rounds):
            for name in models:
                times[name].append(median_time(step(name), args.repeats, args.device))
        lora_t, decay_t = (sorted(times[n])[len(times[n]) // 2] for n in ("LoRA", "DecayLoRA"))
        lora_k, decay_k = kernels_per_step(step("LoRA")), kernels_per_step(step("DecayLoRA"))
        row = [phase, f"{lora_t * 1e3:.1f}", f"{decay_t * 1e3:.1f}", f"{decay_t / lora_t:.3f}"]
        if not args.host_bound:  # the proxy's tensors are not the model's: its memory means nothing
            lora_m, decay_m = memory(step("LoRA"), models["LoRA"]), memory(step("DecayLoRA"), models["DecayLoRA"])
            row += [f"{lora_m / 2**20:.1f}", f"{decay_m / 2**20:.1f}", f"{decay_m / lora_m:.3f}"]
        rows.append(row + [lora_k, decay_k, f"{decay_k / lora_k:.2f}"])
    header = ["phase", "LoRA step ms", "DecayLoRA step ms", "time ratio"]
    if not args.host_bound:
        header += [f"LoRA MiB ({memory_label})", "DecayLoRA MiB", "memory ratio"]
    header += ["LoRA operators", "DecayLoRA operators", "operator ratio"]
    table = markdown_table(header, rows)
    targets = f"r={args.r} on {', '.join(MINILM_TARGETS)}, classifier trained"
    rounds = f"median of {args.rounds} interleaved rounds of {args.repeats} steps."
    if args.host_bound:
        description = (f"the host-bound proxy: all-MiniLM-L6-v2's architecture at width 16 (random weights), "
                       f"{targets}, batch 1 x 8 tokens, one thread, fused AdamW; {rounds} A step costs its dispatch, "
                       "as on a launch-bound GPU.")
    else:
        description = f"all-MiniLM-L6-v2, {targets}, batch {args.batch} x {args.max_length} tokens, AdamW; {rounds}"
    if args.distillation:
        description += " DecayLoRA distils the pretrained network's hidden states (a teacher forward per step)."
    # each variant's (section suffix, title suffix, command flags); a batch other than the default gets its own
    # section: a larger one shows the regime bound by arithmetic
    other_batch = not args.host_bound and (args.batch, args.max_length) != DEFAULT_BATCH
    variants = [part for on, part in [
        (args.distillation, ("-kd", "", " --distillation")),
        (args.host_bound, ("-host-bound", ", host-bound proxy", " --host-bound")),
        (other_batch, (f"-batch-{args.batch}x{args.max_length}", f", batch {args.batch} x {args.max_length}",
                       f" --batch {args.batch} --max-length {args.max_length}")),
    ] if on]
    title = "Training cost" + (" with distillation" if args.distillation else "") + " against PEFT LoRA"
    report("training-cost" + "".join(v[0] for v in variants), "training_cost.py" + "".join(v[2] for v in variants),
           args, title + "".join(v[1] for v in variants), description, table)


def shrunk(model):
    """``model``'s architecture at width 16 (2 heads, feed-forward 32), freshly initialised: every layer and module
    is there, the arithmetic is negligible."""
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 16, 32, 2
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


if __name__ == "__main__":
    main()
