"""Fine-tune a text classifier with DecayLoRA, then compress it: the main job, in one command.

    python examples/finetune_and_compress.py

Offline by default: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) and the Rotten Tomatoes critic
snippets, both shipped inside PyPI packages (``bash .ci/install-assets``; see ``examples/assets.py``). The run

1. fine-tunes the model with DecayLoRA through ``transformers.Trainer`` (+ ``DecayLoraCallback``, progress bars on):
   the frozen weight of every adapted layer decays to 0 while the rank-``r`` adapter takes over;
2. compresses it with ``compress_and_unload()``: every adapted ``Linear(in, out)`` becomes ``Linear(in, r)`` then
   ``Linear(r, out)``;
3. prints side by side, for the fine-tuned model before compression and for the compressed model: held-out
   accuracy, adapted-layer and total parameter counts, size on disk (safetensors) and CPU latency per batch;
4. saves the compressed model with ``save_compressed`` (reload it with ``peft_decaylora.load_compressed(dir)``)
   and writes a figure of the run (decay factor and noise scale, training loss, validation accuracy).

Flags choose the rank, the length of the run, the target modules, and a Hub model or dataset instead of the
packaged ones (``--model sentence-transformers/all-MiniLM-L6-v2 --dataset cornell-movie-review-data/rotten_tomatoes``).
``python examples/finetune_and_compress.py --help`` lists them all.

Defaults: DecayLoRA r=128 (lora_alpha=128) on average on every Linear of the encoder (query, key, value, attention
output and the feed-forward block of all 6 layers: 2x fewer parameters in those layers; ``rank_by_depth=-0.5`` gives
the bottom layer rank 192 and the top one 64), the classifier trained in full, the adapter initialised from the
top-r SVD part of each weight (which takes over as the weight fades), that split refined on the activations of 32
training batches (``initialize_from_activations``), distillation of the last layer's hidden states from the
pretrained network (weight 3), noise off, d from 1 to 0 between 10% and 90% of the run, 2 epochs (642 steps of 32),
lr 5e-4 with linear warm-up/decay; 10,252 training, 500 validation (for the curve), 2,000 held-out test snippets
(stratified, never used for choices made during the run). This is the best setting of ``benchmarks/quality.py``
(BENCHMARKS.md), which also lists what did worse.

Measured with the defaults on version 0.2 (torch 2.13 CPU, 2 cores, a fresh clone set up by command 1 of the README;
another training run shared the cores, so the latencies are slower than on an idle machine):
                             DecayLoRA (PeftModel)  merged (original size)  compressed
  held-out accuracy                         0.8225                  0.8225      0.8225
  adapted-layer parameters                                      10,637,568   5,329,152
  total parameters                                              22,713,986  17,405,570
  size on disk (safetensors)                                      86.7 MiB    66.4 MiB
  CPU latency / batch of 64                1007 ms                 1255 ms      874 ms
  wall time 1579 s (training 1302 s); the compressed model reloaded from disk gives identical logits.
Version 0.1 (commit 3644f13, docs/ablations.md) reached 0.8265 with these defaults; with ``--rank-by-depth 0`` (the
same rank everywhere) 0.8255, with ``--calibration-batches 0`` as well (the plain SVD split) 0.8130, and with every
layer distilled too (``distillation_layers=None``) 0.8175.
With ``--epochs 1`` (with the plain SVD split and every layer distilled, the defaults then) it reached 0.7975. For
reference, full fine-tuning reached 0.8155 in 1 epoch and 0.8273 in 2, and LoRA 0.79-0.82 in 1 epoch, on this split
(original size). Before the SVD initialisation and distillation defaults, this script reached 0.777 on the
feed-forward layers alone (r=96, 2 epochs), and 0.753 with attention added.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads made training
# several times slower here. Must be set before torch starts its thread pool; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Every Linear of the encoder (query, key, value, attention output, and the feed-forward block), not the pooler.
DEFAULT_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune with DecayLoRA, compress, and compare (offline by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="Hub name or local path of a sequence-classification backbone (default: the packaged "
                        "all-MiniLM-L6-v2, offline).")
    g.add_argument("--dataset", default=None,
                   help="Hub dataset name, local dataset directory or csv with text/label columns (default: the "
                        "packaged Rotten Tomatoes snippets, offline).")
    g.add_argument("--text-column", default="text", help="Text column of --dataset.")
    g.add_argument("--label-column", default="label", help="Label column of --dataset.")
    g.add_argument("--train-size", type=int, default=None, help="Use only this many training examples.")
    g.add_argument("--validation-size", type=int, default=500,
                   help="Examples held out of the training split for the accuracy curve during training.")
    g.add_argument("--test-size", type=int, default=None,
                   help="Evaluate on only this many held-out test examples (default: the whole test split).")
    g.add_argument("--max-length", type=int, default=64, help="Maximum tokens per example.")
    g = p.add_argument_group("DecayLoRA")
    g.add_argument("--rank", "-r", type=int, default=128, help="Adapter rank = rank of each compressed layer.")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: equal to --rank, i.e. s = 1).")
    g.add_argument("--target-modules", default=DEFAULT_TARGETS,
                   help="Comma-separated module names to adapt and compress, or a regex (full match, as in PEFT). "
                        "The default is every Linear of a BERT-style encoder.")
    g.add_argument("--modules-to-save", default="classifier",
                   help="Comma-separated modules trained in full (the new classifier head must be one).")
    g.add_argument("--noise", default="off", choices=["vanish", "keep", "off"], help="Noise schedule.")
    g.add_argument("--decay-start", type=float, default=0.1, help="Start of the decay, fraction of the run.")
    g.add_argument("--decay-end", type=float, default=0.9, help="End of the decay, fraction of the run.")
    g.add_argument("--init", default="svd", choices=["svd", "zeros"],
                   help="'svd': the adapter starts at the top-r part of W and the residual decays; 'zeros': B = 0.")
    g.add_argument("--rank-by-depth", type=float, default=-0.5,
                   help="rank_by_depth in [-1, 1], the same total rank moved between the layers: -0.5 gives the "
                        "bottom layer 1.5x the rank and the top one 0.5x (with the calibration, 2 epochs: +0.8 points "
                        "at 4x, -0.2 at 2x, within the seeds' spread); 0: the same rank everywhere.")
    g.add_argument("--calibration-batches", type=int, default=32,
                   help="Training batches that refine the SVD split to the layers' inputs before training "
                        "(initialize_from_activations; with 2 epochs it gained 0.8 points at 4x and kept 2x); "
                        "0: the plain SVD split. Only with --init svd.")
    g.add_argument("--distillation-weight", type=float, default=3.0,
                   help="Weight of the hidden-state distillation from the pretrained network (0: none).")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=2.0, help="Training epochs (ignored with --max-steps).")
    g.add_argument("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
    g.add_argument("--lr", type=float, default=5e-4, help="Peak learning rate (linear warm-up 6%%, then linear decay).")
    g.add_argument("--batch-size", type=int, default=32, help="Training batch size.")
    g.add_argument("--eval-batch-size", type=int, default=64, help="Batch size of evaluation and latency.")
    g.add_argument("--evals", type=int, default=5, help="Validation accuracy measurements during training.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the split, the initialisation and the order.")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="outputs/finetune_and_compress", help="Where the results go.")
    g.add_argument("--latency-batches", type=int, default=5, help="Test batches timed per model (3 passes each).")
    g.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data and model
def load_data(args, tokenizer):
    from datasets import ClassLabel

    from assets import load_rotten_tomatoes

    dd = load_rotten_tomatoes(source=args.dataset, seed=args.seed)
    if args.text_column != "text" or args.label_column != "label":
        dd = dd.rename_columns({args.text_column: "text", args.label_column: "label"})
    split = dd["train"].train_test_split(test_size=args.validation_size, seed=args.seed, shuffle=True)
    train, validation = split["train"], split["test"]
    test = dd["test"] if "test" in dd else dd["validation"]
    if args.train_size is not None:
        train = train.select(range(min(args.train_size, len(train))))
    if args.test_size is not None:
        test = test.select(range(min(args.test_size, len(test))))
    feature = train.features["label"]
    num_labels = feature.num_classes if isinstance(feature, ClassLabel) else len(set(train["label"]))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    columns = [c for c in train.column_names if c != "label"]
    tokenized = [d.map(tokenize, batched=True, remove_columns=columns) for d in (train, validation, test)]
    return (*tokenized, num_labels)


def adapted_keys(model) -> list[str]:
    from peft_decaylora import DecayLoraLayer

    return [k for k, m in model.named_modules() if isinstance(m, DecayLoraLayer)]


def count_parameters(module) -> int:
    # Shared tensors (tied embeddings) once.
    return sum({p.data_ptr(): p.numel() for p in module.parameters()}.values())


def safetensors_size(model) -> int:
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


# --------------------------------------------------------------------------------------------- measurements
def make_batches(dataset, collator, batch_size):
    rows = [dataset[i] for i in range(len(dataset))]
    batches = []
    for i in range(0, len(rows), batch_size):
        batch = collator(rows[i : i + batch_size])
        batches.append(batch)
    return batches


@torch.inference_mode()
def accuracy(model, batches) -> float:
    model.eval()
    correct = total = 0
    for batch in batches:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


@torch.inference_mode()
def latencies(models: dict, batches, repeats: int = 3) -> dict[str, float]:
    """Seconds per batch of each model over ``batches``: the best of ``repeats`` passes, the models interleaved so
    that changes in the machine's load hit all alike (the minimum is the least disturbed by other processes)."""
    times = {name: [] for name in models}
    inputs = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    for model in models.values():
        model.eval()
        model(**inputs[0])  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            for batch in inputs:
                model(**batch)
            times[name].append((time.perf_counter() - start) / len(inputs))
    return {name: min(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- figure
def plot_run(log_history, path, title, loss_title="training loss"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = [(h["step"], h["decay_factor"], h.get("noise_scale", 0.0)) for h in log_history if "decay_factor" in h]
    loss = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    acc = sorted({h["step"]: h["eval_accuracy"] for h in log_history if "eval_accuracy" in h}.items())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    if sched:
        s, d, n = zip(*sched)
        ax.plot(s, d, label="decay factor d")
        ax.plot(s, n, label="noise scale sqrt(1-d²)", linestyle="--")
    ax.set_xlabel("optimizer step"), ax.set_title("schedule"), ax.set_ylim(-0.05, 1.05), ax.legend()
    ax = axes[1]
    if loss:
        ax.plot(*zip(*loss), color="tab:red")
    ax.set_xlabel("optimizer step"), ax.set_title(loss_title)
    ax = axes[2]
    if acc:
        ax.plot(*zip(*acc), marker="o", color="tab:green")
    ax.set_xlabel("optimizer step"), ax.set_title("validation accuracy (eval mode)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 170), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import transformers
    from peft import get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from assets import minilm_path
    from peft_decaylora import DecayLoraConfig, initialize_from_activations, load_compressed, save_compressed
    from peft_decaylora.training import DecayLoraCallback

    transformers.set_seed(args.seed)
    if args.no_progress:
        transformers.logging.disable_progress_bar()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = minilm_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, validation, test, num_labels = load_data(args, tokenizer)
    print(f"data: {len(train)} train / {len(validation)} validation / {len(test)} held-out test examples, "
          f"{num_labels} classes")
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)

    targets = args.target_modules
    target_modules = [t.strip() for t in targets.split(",") if t.strip()] if "," in targets or targets.isidentifier() \
        else targets
    config = DecayLoraConfig(
        task_type="SEQ_CLS",
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else float(args.rank),
        target_modules=target_modules,
        modules_to_save=[m.strip() for m in args.modules_to_save.split(",") if m.strip()] or None,
        noise=args.noise,
        decay_start=args.decay_start,
        decay_end=args.decay_end,
        init_weights="svd" if args.init == "svd" else True,
        distillation="hidden_states" if args.distillation_weight else "off",
        distillation_weight=args.distillation_weight,
        rank_by_depth=args.rank_by_depth,
    )
    # The model before compression has the base model's architecture (merging writes d W + s B A + C into it).
    total_before, size_before = count_parameters(base), safetensors_size(base)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    keys = adapted_keys(model)
    kinds = ", ".join(sorted({".".join(k.split(".")[-2:]) for k in keys}))
    print(f"adapting {len(keys)} layers ({kinds})")

    collator = DataCollatorWithPadding(tokenizer)
    if args.calibration_batches and args.init == "svd":
        size = min(len(train), args.calibration_batches * args.batch_size)
        calibration = train.shuffle(seed=args.seed).select(range(size))
        initialize_from_activations(model, make_batches(calibration, collator, args.batch_size))
        print(f"SVD split refined on the activations of {len(calibration)} training examples")
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.max_steps or max(1, math.ceil(steps_per_epoch * args.epochs))
    eval_steps = max(1, math.ceil(total_steps / max(1, args.evals)))  # the last evaluation is at the end
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        max_steps=total_steps,
        learning_rate=args.lr,
        warmup_steps=max(1, round(0.06 * total_steps)),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=max(1, total_steps // 50),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding, faster on CPU
        dataloader_num_workers=0,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )

    def compute_metrics(prediction):
        logits, labels = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[DecayLoraCallback()],
    )
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    state = model.base_model.schedule_state()
    print(f"training: {total_steps} steps in {train_seconds:.0f} s; final schedule {state}")

    # ---- before compression: the DecayLoRA model (PEFT, eval mode) and the same model merged into dense weights
    model.eval()
    test_batches = make_batches(test, collator, args.eval_batch_size)
    latency_batches = test_batches[: max(1, args.latency_batches)]
    acc_peft = accuracy(model, test_batches)
    merged = copy.deepcopy(model)
    merged.merge_adapter()  # dense weights of the original shapes, for the latency of the uncompressed model
    acc_merged = accuracy(merged, test_batches)
    adapted_before = sum(count_parameters(model.get_submodule(k).get_base_layer()) for k in keys)

    # ---- compress
    # (on a copy, to time the DecayLoRA model beside it; `model.compress_and_unload()` alone is the usual call)
    compressed = copy.deepcopy(model).compress_and_unload(progressbar=not args.no_progress)
    compressed.eval()
    acc_compressed = accuracy(compressed, test_batches)
    compressed_layers = {k: compressed.get_submodule(k.removeprefix("base_model.model.")) for k in keys}
    adapted_after = sum(count_parameters(m) for m in compressed_layers.values())
    total_after = count_parameters(compressed)
    save_dir = save_compressed(compressed, out / "compressed", tokenizer=tokenizer)
    size_after = os.path.getsize(save_dir / "model.safetensors")

    lat = latencies({"peft": model, "merged": merged, "compressed": compressed}, latency_batches, repeats=3)

    # ---- reload from disk, as a user would
    reloaded = load_compressed(save_dir)
    probe = {k: v for k, v in test_batches[0].items() if k != "labels"}
    with torch.inference_mode():
        reload_diff = float((reloaded(**probe).logits - compressed(**probe).logits).abs().max())

    figure = out / "decaylora_run.png"
    plot_run(trainer.state.log_history, figure,
             f"DecayLoRA r={args.rank} (rank_by_depth {args.rank_by_depth:g}), init={args.init} "
             f"({args.calibration_batches if args.init == 'svd' else 0} calibration batches), distillation weight "
             f"{args.distillation_weight:g}, "
             f"noise={args.noise}, on {len(keys)} layers ({kinds}); held-out accuracy {acc_peft:.3f} (DecayLoRA) = "
             f"{acc_compressed:.3f} (compressed)",
             "training loss" + (" (task + weighted distillation)" if args.distillation_weight else ""))
    wall = time.perf_counter() - t_start

    tokens = int(sum(int(b["attention_mask"].sum()) for b in latency_batches)) / len(latency_batches)
    rows = [
        ("held-out accuracy", f"{acc_peft:.4f}", f"{acc_merged:.4f}", f"{acc_compressed:.4f}"),
        ("adapted-layer parameters", "", f"{adapted_before:,}", f"{adapted_after:,}"),
        ("total parameters", "", f"{total_before:,}", f"{total_after:,}"),
        ("size on disk (safetensors)", "", human_bytes(size_before), human_bytes(size_after)),
        (f"CPU latency / batch of {args.eval_batch_size}", f"{lat['peft'] * 1e3:.0f} ms", f"{lat['merged'] * 1e3:.0f} ms",
         f"{lat['compressed'] * 1e3:.0f} ms"),
    ]
    header = ("", "DecayLoRA (PeftModel)", "merged (original size)", "compressed")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    print()
    ranks = f"rank {args.rank}" + (f" on average (rank_by_depth={args.rank_by_depth:g})" if args.rank_by_depth else "")
    print(f"{len(test)} held-out test examples; {len(keys)} adapted layers at {ranks}; "
          f"latency: mean over {len(latency_batches)} batches, best of 3 passes (~{tokens:.0f} tokens/batch), {torch.get_num_threads()} "
          "threads")
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"compressed / original: {adapted_after / adapted_before:.1%} of the adapted-layer parameters, "
          f"{total_after / total_before:.1%} of all parameters, {size_after / size_before:.1%} of the file size, "
          f"{lat['compressed'] / lat['merged']:.0%} of the latency")
    print(f"compressed model saved to {save_dir} (reload: peft_decaylora.load_compressed({str(save_dir)!r}); "
          f"max |logit difference| after reload {reload_diff:.2e})")
    print(f"figure written to {figure}")
    print(f"wall time {wall:.0f} s (training {train_seconds:.0f} s)")

    results = {
        "args": vars(args),
        "train_examples": len(train),
        "test_examples": len(test),
        "total_steps": total_steps,
        "accuracy": {"decaylora": acc_peft, "merged": acc_merged, "compressed": acc_compressed},
        "adapted_parameters": {"before": adapted_before, "after": adapted_after},
        "total_parameters": {"before": total_before, "after": total_after},
        "size_bytes": {"before": size_before, "after": size_after},
        "latency_s": lat,
        "reload_max_abs_diff": reload_diff,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "figure": str(figure),
        "compressed_dir": str(save_dir),
        "log_history": trainer.state.log_history,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
