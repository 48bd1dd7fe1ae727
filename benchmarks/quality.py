"""Quality on the default task: DecayLoRA (and its ablations) against full fine-tuning, LoRA and truncated SVD.

all-MiniLM-L6-v2 on the packaged Rotten Tomatoes snippets (offline), fixed held-out split of 2,000 snippets
(``examples/assets.load_rotten_tomatoes``), 64 tokens, batch 32, AdamW with linear warm-up/decay, through the HF
``Trainer``. Methods (``--methods``):

- ``full``: full fine-tuning (the reference; the targets are 99% of it at 2x and 97% at 4x).
- ``lora``: PEFT LoRA with the rank of the row, keeping W (not compressed).
- ``svd``: every adapted Linear replaced by its truncated SVD of rank r (``Linear(in, r)`` then ``Linear(r, out)``,
  the same parameter count as compressed DecayLoRA), then trained with the classifier.
- ``decay-off`` / ``decay-vanish`` / ``decay-keep``: DecayLoRA with that noise schedule; ``-noC`` turns off the
  compensation bias. Accuracy is measured on the *compressed* model (``compress_and_unload()``).

The ranks are chosen so that the adapted layers (every encoder Linear) shrink about 2x, 4x and 8x. Each cell is the
mean and spread (min-max) over ``--seeds``. Results go to the "quality" section of BENCHMARKS.md.

    python benchmarks/quality.py                                      # the full grid (hours on 2 CPU cores)
    python benchmarks/quality.py --train-size 3000 --seeds 0 --ranks 128,64 --methods full,lora,svd,decay-off
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

import peft_decaylora  # noqa: F401
from common import MINILM_TARGETS, REPO, hardware, load_minilm, load_rotten_tomatoes, markdown_table, write_section

METHODS = ["full", "lora", "svd", "decay-off", "decay-vanish", "decay-keep", "decay-off-noC", "decay-vanish-noC"]
ENCODER_LINEAR = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # every encoder Linear, not the pooler


def tokenized_data(tokenizer, train_size, seed):
    data = load_rotten_tomatoes(seed=0)  # the held-out split is fixed; only the training order varies by seed
    train = data["train"].shuffle(seed=seed)
    if train_size:
        train = train.select(range(min(train_size, len(train))))
    columns = ["text"]

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=64)

    return train.map(tokenize, batched=True, remove_columns=columns), data["test"].map(
        tokenize, batched=True, remove_columns=columns
    )


def svd_factorise(model: nn.Module, pattern: str, r: int) -> None:
    """Replace every Linear whose name matches ``pattern`` by its rank-r truncated SVD (two Linears)."""
    import re

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and re.fullmatch(pattern, name):
            U, S, Vh = torch.linalg.svd(module.weight.detach().float(), full_matrices=False)
            root = S[:r].sqrt()
            down = nn.Linear(module.in_features, r, bias=False)
            up = nn.Linear(r, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                down.weight.copy_(root[:, None] * Vh[:r])
                up.weight.copy_(U[:, :r] * root)
                if module.bias is not None:
                    up.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Sequential(down, up))


def build(method: str, r: int, base, total_steps: int):
    """The model to train for ``method`` at rank ``r`` (and whether it is compressed after training)."""
    from peft import LoraConfig, get_peft_model

    from peft_decaylora import DecayLoraConfig

    model = copy.deepcopy(base)
    if method == "full":
        return model
    if method == "svd":
        model.requires_grad_(False)
        svd_factorise(model, ENCODER_LINEAR, r)  # the new factors are trainable, like DecayLoRA's A, B and C
        model.classifier.requires_grad_(True)
        return model
    common = dict(r=r, lora_alpha=r, target_modules=ENCODER_LINEAR, modules_to_save=["classifier"], task_type="SEQ_CLS")
    if method == "lora":
        return get_peft_model(model, LoraConfig(**common))
    _, noise, *flags = method.split("-")
    config = DecayLoraConfig(noise=noise, bias_compensation="noC" not in flags, total_steps=total_steps, **common)
    return get_peft_model(model, config)


def run(method: str, r: int, seed: int, args, base, tokenizer) -> dict:
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peft_decaylora import DecayLoraCallback

    transformers.set_seed(seed)
    train, test = tokenized_data(tokenizer, args.train_size, seed)
    total_steps = math.ceil(len(train) / args.batch_size) * args.epochs
    model = build(method, r, base, total_steps)
    lr = args.lr_full if method == "full" else args.lr_svd if method == "svd" else args.lr
    training_args = TrainingArguments(
        output_dir=str(REPO / "outputs" / "quality"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, num_train_epochs=args.epochs, learning_rate=lr, warmup_steps=max(1, round(0.06 * total_steps)),
        lr_scheduler_type="linear", weight_decay=0.0, logging_steps=50, save_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", seed=seed, disable_tqdm=not args.progress,
    )
    callbacks = [DecayLoraCallback()] if method.startswith("decay") else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=DataCollatorWithPadding(
        tokenizer), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if method.startswith("decay"):
        model = model.compress_and_unload()  # the accuracy reported is the compressed model's
    elif method == "lora":
        model = model.merge_and_unload()
    model.eval()
    correct = 0
    collate = DataCollatorWithPadding(tokenizer)
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = collate([test[j] for j in range(i, min(i + 64, len(test)))])
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return {"method": method, "r": r, "seed": seed, "accuracy": correct / len(test), "seconds": seconds}


def summarize(results: list[dict], ranks: list[int], methods: list[str]) -> str:
    def cell(rows):
        if not rows:
            return "-"
        accuracies = [row["accuracy"] for row in rows]
        spread = f" ({min(accuracies):.3f}-{max(accuracies):.3f})" if len(accuracies) > 1 else ""
        return f"{statistics.mean(accuracies):.4f}{spread}"

    full = [row for row in results if row["method"] == "full"]
    full_mean = statistics.mean(row["accuracy"] for row in full) if full else None
    header = ["rank", "adapted-layer compression"] + [m for m in methods if m != "full"]
    if full_mean:
        header += ["best compressed / full"]
    lines = []
    for r in ranks:
        row = [r, f"{COMPRESSION.get(r, '?')}"]
        best = 0.0
        for method in methods:
            if method == "full":
                continue
            rows = [x for x in results if x["method"] == method and x["r"] == r]
            row.append(cell(rows))
            if rows and method != "lora":
                best = max(best, statistics.mean(x["accuracy"] for x in rows))
        if full_mean:
            row.append(f"{best / full_mean:.1%}")
        lines.append(row)
    seeds = sorted({row["seed"] for row in results})
    prefix = f"Full fine-tuning: {cell(full)} over seeds {seeds}.\n\n" if full else ""
    return prefix + markdown_table(header, lines)


# adapted-layer parameters of MiniLM's encoder Linears (6 x (4 x 384x384 + 2 x 384x1536), with biases) over the
# low-rank factors r * (in + out) + out
COMPRESSION = {r: f"{6 * (4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384)) / (6 * (4 * (r * 768 + 384) + (r * 1920 + 1536) + (r * 1920 + 384))):.1f}x" for r in (256, 192, 128, 96, 64, 48, 32, 24, 16)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ranks", default="128,64,32", help="about 2x, 4x and 8x compression of the adapted layers")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-size", type=int, default=None, help="subset of the 10,752 training snippets")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of LoRA and DecayLoRA")
    parser.add_argument("--lr-full", type=float, default=5e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--lr-svd", type=float, default=2e-4, help="learning rate of the SVD baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--results", default=str(REPO / "outputs" / "quality" / "results.jsonl"),
                        help="JSON lines of finished runs; runs already there are not repeated")
    args = parser.parse_args()
    methods, ranks = args.methods.split(","), [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    setting = {"train_size": args.train_size, "epochs": args.epochs, "lr": args.lr, "lr_full": args.lr_full,
               "lr_svd": args.lr_svd, "batch_size": args.batch_size}
    path = __import__("pathlib").Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = [row for row in done if row.get("setting") == setting]
    base, tokenizer = load_minilm()
    for seed in seeds:
        for method in methods:
            for r in [0] if method == "full" else ranks:
                if any(row["method"] == method and row["r"] == r and row["seed"] == seed for row in done):
                    continue
                result = {**run(method, r, seed, args, base, tokenizer), "setting": setting}
                print(json.dumps(result), flush=True)
                done.append(result)
                with path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
    table = summarize(done, ranks, methods)
    print(table)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if k in ("methods", "ranks", "seeds", "train_size", "epochs", "lr", "lr_full", "lr_svd")
                     and v is not None)
    body = (
        f"### Quality on the default task\n\n`python benchmarks/quality.py {flags}`\n\n"
        f"all-MiniLM-L6-v2 on Rotten Tomatoes, {args.train_size or 10752} training snippets, {args.epochs} epoch(s), "
        f"batch {args.batch_size}, 2,000 held out; accuracy of the compressed model for DecayLoRA and SVD, mean "
        f"(min-max) over seeds {seeds}. Hardware: {hardware(args.device)}.\n\n" + table
    )
    write_section("quality", body)


if __name__ == "__main__":
    main()
