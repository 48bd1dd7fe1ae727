"""Quality on text classification: DecayLoRA (and its ablations) against full fine-tuning, LoRA and truncated SVD.

all-MiniLM-L6-v2 fine-tuned on one offline task (``--task``, each with a fixed held-out split and its token length,
TASKS below): ``rotten_tomatoes`` (the default task: binary sentiment of critic snippets, 64 tokens),
``reuters_r8`` (8 unbalanced newswire topics, 128 tokens; macro-F1 is reported beside accuracy) or
``election_tweets`` (which of two candidates wrote a tweet, 64 tokens). Batch 32, AdamW with linear warm-up/decay,
through the HF ``Trainer``. Methods (``--methods``):

- ``full``: full fine-tuning (the reference; the targets are 99% of it at 2x and 97% at 4x).
- ``lora``: PEFT LoRA with the rank of the row, keeping W (not compressed).
- ``svd``: every adapted Linear replaced by its truncated SVD of rank r (``Linear(in, r)`` then ``Linear(r, out)``,
  the same parameter count as compressed DecayLoRA), then trained with the classifier.
- ``decay-<off|vanish|keep>[-noC][-svd[-cal]][-kd[-fade]][-ln][-pool]``: DecayLoRA with that noise schedule; ``-noC``
  turns off the compensation bias, ``-svd`` uses ``init_weights="svd"`` (else ``True``), ``-cal`` refines that split
  with ``initialize_from_activations`` on the first ``--calibration-batches`` training batches, ``-kd``
  ``distillation="hidden_states"`` with ``--kd-weight``, ``-fade`` ``distillation_schedule="decay"`` (the weight
  fades with d), ``-ln`` trains the LayerNorms too and ``-pool`` the pooler's Linear (``modules_to_save``; otherwise,
  as for LoRA and SVD, they stay frozen).
  ``decay-off-svd-kd --kd-layers 5:`` is the library's default (``distillation_layers=[-1]``: MiniLM's 6th layer) and
  ``decay-off-svd-cal-kd --kd-layers 5: --depth-slope -0.5`` the main job's;
  ``--kd-layers all`` (the knob's default, so that older runs keep their meaning) distils every layer.
  Accuracy is measured on the *compressed* model (``compress_and_unload()``); ``decay-keep`` keeps its noise
  mean, so it is merged instead.

The ranks are chosen so that the adapted layers (every encoder Linear) shrink about 2x, 4x and 8x; ``--attn-ratio``
moves DecayLoRA's ranks between attention and feed-forward matrices at the same parameter count, ``--depth-slope``
(``rank_by_depth``) between the bottom and top layers, ``--lr-head`` gives the classifier head of LoRA and DecayLoRA its own learning rate
and ``--lr-b-ratio`` DecayLoRA's B factors theirs (a multiple of ``--lr``, as in LoRA+). ``--lr``, ``--lr-svd``, ``--lr-head``,
``--kd-weight`` and DecayLoRA's ``--decay-start``, ``--decay-end``, ``--decay-shape``, ``--noise-threshold``,
``--noise-stats``, ``--attn-ratio``, ``--depth-slope``, ``--lr-b-ratio``, ``--lora-dropout``, ``--kd-layers``
(``distillation_layers`` as a slice of the layers, e.g. ``5:``) and ``--head-first`` (the fraction of the steps in which only the classifier head trains) take
comma-separated lists (every combination runs). Each cell is the mean and spread (min-max) over the seeds present.
Finished runs are lines of ``--results`` and are not run again; ``--no-run`` only tabulates them. ``--workers N``
runs N at a time (useful on a GPU). The table goes to the "quality" section of BENCHMARKS.md ("quality-2-epochs"
with ``--epochs 2``, and so on).

    python benchmarks/quality.py --methods full,svd,decay-off-svd-kd --lr 5e-4 --lr-svd 1e-4   # hours on 2 CPU cores
    python benchmarks/quality.py --device cuda --workers 4 --methods full,lora,svd,decay-off-svd-kd --lr 5e-4
    python benchmarks/quality.py --train-size 3000 --seeds 0 --ranks 128 --methods svd,decay-off-svd-kd --lr 5e-4
    python benchmarks/quality.py --task reuters_r8 --epochs 2 --methods full,lora,svd,decay-off-svd-kd --lr 5e-4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import peft_decaylora
from peft_decaylora.schedule import auto_decay_end
from common import MINILM_TARGETS, REPO, hardware, load_minilm, load_rotten_tomatoes, markdown_table, write_section
from assets import load_election_tweets, load_reuters_r8  # noqa: E402  (common puts examples/ on the path)

METHODS = ["full", "lora", "svd", "decay-off", "decay-vanish", "decay-keep", "decay-off-noC", "decay-vanish-noC",
           "decay-off-svd", "decay-vanish-svd", "decay-off-kd", "decay-off-svd-kd", "decay-off-svd-cal-kd",
           "decay-vanish-svd-kd"]
METHOD_FORMS = "full, lora, svd, decay-<off|vanish|keep>[-noC][-svd[-cal]][-kd[-fade]][-ln][-pool]"
# METHOD_FORMS as a regex: a new method flag goes into both
METHOD_PATTERN = r"full|lora|svd|decay-(off|vanish|keep)(-noC)?(-svd(-cal)?)?(-kd(-fade)?)?(-ln)?(-pool)?"
ENCODER_LINEAR = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # every encoder Linear, not the pooler


@dataclasses.dataclass(frozen=True)
class Task:
    """An offline text-classification task: ``load(source)`` gives ``train`` / ``test`` with ``text`` and a
    ``ClassLabel`` ``label`` (the test split fixed); ``max_length`` tokens per example; ``description`` for tables."""

    load: Callable[[Optional[str]], Any]
    max_length: int
    description: str


TASKS = {
    "rotten_tomatoes": Task(lambda source: load_rotten_tomatoes(seed=0, source=source), 64,
                            "Rotten Tomatoes (binary sentiment of critic snippets; 10,752 training, 2,000 held out)"),
    "reuters_r8": Task(lambda source: load_reuters_r8(), 128,
                       "Reuters-21578 R8 (8 newswire topics, unbalanced; its 5,485 / 2,189 split)"),
    "election_tweets": Task(lambda source: load_election_tweets(), 64,
                            "2016 election tweets (author: Clinton or Trump; 5,434 training, 1,000 held out)"),
}
DEFAULT_TASK = "rotten_tomatoes"  # result lines without a task ran on it


def tokenized_data(tokenizer, task: str, train_size, seed, source=None):
    """The task's training split in the order of ``seed`` (its first ``train_size`` rows) and its fixed test split."""
    spec = TASKS[task]
    data = spec.load(source)
    train = data["train"].shuffle(seed=seed)
    if train_size:
        train = train.select(range(min(train_size, len(train))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=spec.max_length)

    return (train.map(tokenize, batched=True, remove_columns=["text"]),
            data["test"].map(tokenize, batched=True, remove_columns=["text"]))


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """The mean over classes of each class's F1 (a class never predicted nor present scores 0)."""
    scores = []
    for c in range(num_labels):
        true_positive = np.sum((predictions == c) & (labels == c))
        predicted, actual = np.sum(predictions == c), np.sum(labels == c)
        scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
    return float(np.mean(scores))


def svd_factorise(model: nn.Module, pattern: str, r: int) -> None:
    """Replace every Linear whose name matches ``pattern`` by its rank-r truncated SVD (two Linears)."""
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


def attention_rank_split(r: int, ratio: float) -> dict:
    """Ranks with the parameters of rank ``r`` everywhere: ``ratio * r`` for the four 384x384 attention matrices of a
    layer, the rest of the layer's budget for its two 384x1536 feed-forward matrices."""
    attention = max(1, round(ratio * r))
    feed_forward = round((4 * 768 * r + 2 * 1920 * r - 4 * 768 * attention) / (2 * 1920))
    names = [r"query", r"key", r"value", r"attention\.output\.dense"]
    return {"r": feed_forward, "lora_alpha": feed_forward, "rank_pattern": {name: attention for name in names},
            "alpha_pattern": {name: attention for name in names}}


def build(spec: dict, base, total_steps: int):
    """The model to train for ``spec["method"]`` at rank ``spec["r"]``."""
    from peft import LoraConfig, get_peft_model

    from peft_decaylora import DecayLoraConfig

    method, r = spec["method"], spec["r"]
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
    knobs = decay_knobs(spec)
    attn_ratio, depth_slope = knobs.pop("attn_ratio"), knobs.pop("depth_slope")
    knobs.pop("head_first"), knobs.pop("lr_b_ratio")  # training schedules, set in optimizers()
    kd_layers = knobs.pop("kd_layers")  # "all", or a Python slice of the layers: ":5" (all but the top one), "5:"
    layers = list(range(base.config.num_hidden_layers))
    knobs["distillation_layers"] = None if kd_layers == "all" else layers[
        slice(*(int(i) if i else None for i in kd_layers.split(":")))]
    if attn_ratio != 1.0 and depth_slope:
        raise ValueError("--attn-ratio and --depth-slope both set ranks: vary one at a time")
    if attn_ratio != 1.0:
        common.update(attention_rank_split(r, attn_ratio))
    _, noise, *flags = method.split("-")
    # -ln / -pool: the LayerNorms / the pooler's Linear train in full too, as in full fine-tuning (not compressed)
    trained_in_full = {"ln": "LayerNorm", "pool": "pooler.dense"}
    common["modules_to_save"] += [module for flag, module in trained_in_full.items() if flag in flags]
    config = DecayLoraConfig(
        noise=noise, bias_compensation="noC" not in flags, init_weights="svd" if "svd" in flags else True,
        distillation="hidden_states" if "kd" in flags else "off", distillation_weight=spec["kd_weight"],
        distillation_schedule="decay" if "fade" in flags else "constant",
        rank_by_depth=depth_slope, total_steps=total_steps, **knobs, **common,
    )
    return get_peft_model(model, config)


def run(spec: dict, args, base, tokenizer) -> dict:
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peft_decaylora import DecayLoraCallback, initialize_from_activations

    method, seed = spec["method"], spec["seed"]
    transformers.set_seed(seed)
    train, test = tokenized_data(tokenizer, args.task, args.train_size, seed, args.data)
    total_steps = math.ceil(len(train) / args.batch_size) * args.epochs
    model = build(spec, base, total_steps)
    if "cal" in method.split("-"):
        collate = DataCollatorWithPadding(tokenizer)
        batches = [collate([train[j] for j in range(i, min(i + args.batch_size, len(train)))])
                   for i in range(0, min(len(train), args.calibration_batches * args.batch_size), args.batch_size)]
        initialize_from_activations(model, batches)
    warmup = max(1, round(0.06 * total_steps))
    training_args = TrainingArguments(
        output_dir=str(REPO / "outputs" / "quality"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, num_train_epochs=args.epochs, learning_rate=spec["lr"],
        warmup_steps=warmup, lr_scheduler_type="linear", weight_decay=0.0,
        logging_steps=50, save_strategy="no", report_to="none", use_cpu=args.device == "cpu", seed=seed,
        disable_tqdm=not args.progress,
    )
    callbacks = [DecayLoraCallback()] if method.startswith("decay") else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=DataCollatorWithPadding(
        tokenizer), callbacks=callbacks, optimizers=optimizers(model, spec, total_steps, warmup))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if method.startswith("decay-keep"):
        model = model.merge_and_unload()  # noise="keep" never lets go of the noise mean: not compressible
    elif method.startswith("decay"):
        model = model.compress_and_unload()  # the accuracy reported is the compressed model's
    elif method == "lora":
        model = model.merge_and_unload()
    model.eval()
    predictions, labels = [], []
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = collate([test[j] for j in range(i, min(i + 64, len(test)))])
            labels.append(batch.pop("labels"))
            predictions.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu())
    predictions, labels = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {**spec, "accuracy": float(np.mean(predictions == labels)),
            "macro_f1": macro_f1(predictions, labels, base.config.num_labels), "seconds": round(seconds, 1),
            "hardware": hardware(args.device), "package": f"peft_decaylora {peft_decaylora.__version__}"}


def optimizers(model: nn.Module, spec: dict, total_steps: int, warmup: int) -> tuple:
    """The Trainer's AdamW and linear warm-up/decay, with the classifier head at ``spec["lr_head"]`` and, for
    DecayLoRA's ``head_first`` > 0, only the head training for that fraction of the steps (linear probing first; the
    rest then warms up); (None, None), the Trainer's own, without either."""
    decay = spec["method"].startswith("decay")
    head_first = round(decay_knobs(spec)["head_first"] * total_steps) if decay else 0
    lr_b_ratio = decay_knobs(spec)["lr_b_ratio"] if decay else 1.0
    if spec.get("lr_head") is None and not head_first and lr_b_ratio == 1.0:
        return None, None
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for name, p in trained if ".classifier." in f".{name}"]
    up = [p for name, p in trained if ".classifier." not in f".{name}" and ".decaylora_B." in f".{name}"]
    rest = [p for name, p in trained if ".classifier." not in f".{name}" and ".decaylora_B." not in f".{name}"]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": up, "lr": spec["lr"] * lr_b_ratio},
                                   {"params": head, "lr": spec.get("lr_head") or spec["lr"]}],
                                  lr=spec["lr"], weight_decay=0.0)

    def linear(start):  # transformers' get_linear_schedule_with_warmup, from step ``start`` on
        def factor(step):
            if step < start + warmup:
                return max(0.0, (step - start) / warmup)
            return max(0.0, (total_steps - step) / (total_steps - start - warmup))
        return factor

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [linear(head_first), linear(head_first), linear(0)])


def label(row: dict) -> str:
    """The table row a result belongs to: the method, plus its learning rate and any non-default knob."""
    parts = [row["method"], f"lr {row['lr']:g}"]
    if row.get("lr_head") is not None:
        parts.append(f"head lr {row['lr_head']:g}")
    if row["method"].startswith("decay"):
        if "kd" in row["method"].split("-"):
            parts.append(f"kd {row['kd_weight']:g}")
        # a knob is named where it differs from the library's default (the benchmark's own where it has none)
        library = peft_decaylora.DecayLoraConfig(  # "auto" as filled in for MiniLM
            decay_end=auto_decay_end(causal_lm=False, transformers_model=True))
        parts += [f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                  for name, value in decay_knobs(row).items() if value != getattr(library, name, DECAY_KNOBS[name][0])]
    return ", ".join(parts)


def summarize(results: list[dict], ranks: list[int], with_f1: bool = False) -> str:
    def cell(rows):
        if not rows:
            return "-"
        accuracies = [row["accuracy"] for row in rows]
        spread = f" ({min(accuracies):.3f}-{max(accuracies):.3f}, n={len(accuracies)})" if len(accuracies) > 1 else ""
        f1 = [row["macro_f1"] for row in rows if "macro_f1" in row]
        return f"{statistics.mean(accuracies):.4f}{spread}" + (
            f", macro-F1 {statistics.mean(f1):.4f}" if with_f1 and len(f1) == len(rows) else "")

    full = [row for row in results if row["method"] == "full"]
    full_mean = statistics.mean(row["accuracy"] for row in full) if full else None
    labels = sorted({label(row) for row in results if row["method"] != "full"},
                    key=lambda name: (METHODS.index(name.split(",")[0]) if name.split(",")[0] in METHODS else 99, name))
    header = ["method"] + [f"r={r} ({COMPRESSION.get(r, '?')})" for r in ranks]
    lines = []
    for name in labels:
        line = [name]
        for r in ranks:
            rows = [x for x in results if label(x) == name and x["r"] == r]
            text = cell(rows)
            if rows and full_mean and not name.startswith("lora"):
                text += f"; {statistics.mean(x['accuracy'] for x in rows) / full_mean:.1%} of full"
            line.append(text)
        lines.append(line)
    prefix = f"Full fine-tuning: {cell(full)} ({label(full[0])}).\n\n" if full else ""
    return prefix + markdown_table(header, lines)


# adapted-layer parameters of MiniLM's encoder Linears (6 x (4 x 384x384 + 2 x 384x1536), with biases) over the
# low-rank factors r * (in + out) + out
COMPRESSION = {r: f"{6 * (4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384)) / (6 * (4 * (r * 768 + 384) + (r * 1920 + 1536) + (r * 1920 + 384))):.1f}x" for r in (256, 192, 128, 96, 64, 48, 32, 24, 16)}
# DecayLoRA's benchmark knobs: spec key -> (default, type); each has a --flag (decay_start: --decay-start) that takes
# a comma-separated list. attn_ratio is quality.py's own (see attention_rank_split); the others are config fields.
# The defaults are written out, not read from DecayLoraConfig: a result line without a knob ran at this value, and
# must keep meaning it if the library's default ever changes.
DECAY_KNOBS = {"decay_start": (0.1, float), "decay_end": (0.9, float), "decay_shape": ("linear", str),
               "noise_threshold": (0.3, float), "noise_stats": ("tensor", str), "attn_ratio": (1.0, float),
               "lora_dropout": (0.0, float), "kd_layers": ("all", str), "head_first": (0.0, float),
               "depth_slope": (0.0, float), "lr_b_ratio": (1.0, float)}
KNOB_HELP = {"attn_ratio": "DecayLoRA's attention rank as a multiple of r, the feed-forward rank taking the rest of "
             "the same parameter budget (value(s))",
             "kd_layers": "distillation_layers as a Python slice of the layers, e.g. ':5' or '5:' (value(s))",
             "head_first": "fraction of the steps in which only the classifier head trains (value(s))",
             "depth_slope": "DecayLoRA's rank_by_depth: -0.5 gives the bottom layer 1.5 r and the top one r / 2, at "
             "the same parameter count (value(s))",
             "lr_b_ratio": "learning rate of B over that of A, as in LoRA+ (arXiv 2402.12354) (value(s))"}


def decay_knobs(row: dict) -> dict:
    """The row's value of every DecayLoRA knob; runs from before a knob existed ran at its default."""
    return {name: row.get(name, default) for name, (default, _) in DECAY_KNOBS.items()}


def _worker(job):
    spec, args = job
    num_labels = TASKS[args.task].load(args.data)["train"].features["label"].num_classes
    return run(spec, args, *_model_and_tokenizer(args.model, args.threads, num_labels))


@functools.lru_cache(maxsize=1)
def _model_and_tokenizer(model: str | None, threads: int, num_labels: int):
    """Loaded once per worker process."""
    if threads:
        torch.set_num_threads(threads)
    return load_minilm(model, num_labels=num_labels)


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"{METHOD_FORMS} (see above)")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS), help="the text-classification task")
    parser.add_argument("--ranks", default="128,64,32", help="about 2x, 4x and 8x compression of the adapted layers")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-size", type=int, default=None, help="first N of the (shuffled) training split")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", default="1e-3", help="learning rate(s) of LoRA and DecayLoRA, comma-separated")
    parser.add_argument("--lr-full", default="5e-5", help="learning rate(s) of full fine-tuning")
    parser.add_argument("--lr-svd", default="1e-3", help="learning rate(s) of the SVD baseline")
    parser.add_argument("--lr-head", default="default", help="learning rate(s) of the classifier head of LoRA and "
                        "DecayLoRA; 'default': the rate of the rest")
    parser.add_argument("--kd-weight", default="1.0", help="distillation_weight(s) of the -kd methods")
    for name, (default, _) in DECAY_KNOBS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=str(default),
                            help=KNOB_HELP.get(name, f"{name} value(s) of DecayLoRA"))
    parser.add_argument("--calibration-batches", type=int, default=32, help="training batches for -cal")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a Hub name or local path instead of the packaged MiniLM")
    parser.add_argument("--data", default=None, help="rotten_tomatoes only: a csv (text, label/category) or Hub dataset instead of the packaged corpus")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes); useful on a GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--no-run", action="store_true", help="only tabulate the runs already in --results")
    parser.add_argument("--results", default=str(REPO / "outputs" / "quality" / "results.jsonl"),
                        help="JSON lines of finished runs; runs already there are not repeated")
    args = parser.parse_args()
    methods, ranks = args.methods.split(","), [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [m for m in methods if not re.fullmatch(METHOD_PATTERN, m)]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHOD_FORMS}")
    if args.data and args.task != DEFAULT_TASK:
        parser.error(f"--data replaces the {DEFAULT_TASK} corpus; --task {args.task} has no other source")
    setting = {"task": args.task, "train_size": args.train_size, "epochs": args.epochs, "batch_size": args.batch_size}
    jobs = []
    for seed in seeds:
        for method in methods:
            lrs = floats(args.lr_full if method == "full" else args.lr_svd if method == "svd" else args.lr)
            kd_weights = floats(args.kd_weight) if "kd" in method.split("-") else [float(args.kd_weight.split(",")[0])]
            knob_values = [[kind(value) for value in getattr(args, name).split(",")] if method.startswith("decay")
                           else [default] for name, (default, kind) in DECAY_KNOBS.items()]
            head_lrs = [None] if method in ("full", "svd") else [
                None if value == "default" else float(value) for value in args.lr_head.split(",")]
            for r, lr, lr_head, kd_weight, *knobs in itertools.product(
                    [0] if method == "full" else ranks, lrs, head_lrs, kd_weights, *knob_values):
                jobs.append({"method": method, "r": r, "seed": seed, "lr": lr, "lr_head": lr_head,
                             "kd_weight": kd_weight, **dict(zip(DECAY_KNOBS, knobs)), **setting})
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = [{"task": DEFAULT_TASK, **row} for row in done]
    done = [row for row in done if all(row.get(k) == v for k, v in setting.items())]
    finished = {run_key(row) for row in done}
    todo = [job for job in jobs if run_key(job) not in finished]
    if args.no_run:
        print(f"tabulating the {len(jobs) - len(todo)} runs of this grid already in {path}", flush=True)
        todo = []
    else:
        print(f"{len(todo)} runs to do, {len(jobs) - len(todo)} already in {path}", flush=True)
    if args.workers > 1 and todo:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=None) as pool:
            finished = pool.imap_unordered(_worker, [(job, args) for job in todo])
            _collect(finished, path, done)
    else:
        _collect((_worker((job, args)) for job in todo), path, done)
    asked = {run_key(job) for job in jobs}
    wanted = [row for row in done if run_key(row) in asked]
    table = summarize(wanted, ranks, with_f1=args.task == "reuters_r8")
    print(table)
    if args.no_write:
        return
    machines = sorted({row.get("hardware", "?") for row in wanted})
    task = "" if args.task == DEFAULT_TASK else f"-{args.task}"
    body = (
        f"### Quality on {TASKS[args.task].description.split(' (')[0]}"
        f"{'' if args.epochs == 1 else f', {args.epochs} epochs'}\n\n"
        f"`python benchmarks/quality.py {' '.join(sys.argv[1:])}`\n\n"
        f"all-MiniLM-L6-v2 on {TASKS[args.task].description}, "
        f"{f'the first {args.train_size} training examples, ' if args.train_size else ''}{args.epochs} epoch(s), "
        f"batch {args.batch_size}, {TASKS[args.task].max_length} tokens; accuracy"
        f"{' (and macro-F1)' if args.task == 'reuters_r8' else ''} of the compressed model for DecayLoRA (decay-keep: "
        f"merged, since its noise mean never leaves) and SVD, mean (min-max, n seeds) over seeds {seeds}; % of full "
        f"fine-tuning's mean accuracy. Hardware: {'; '.join(machines)}.\n\n" + table
    )
    write_section(f"quality{task}" + ("" if args.epochs == 1 else f"-{args.epochs}-epochs"), body)


def run_key(run: dict) -> tuple:
    """What identifies a run: the head's learning rate where set; the distillation weight only for -kd methods; the
    DecayLoRA knobs only for DecayLoRA."""
    method, decay = run["method"], run["method"].startswith("decay")
    return (run.get("task", DEFAULT_TASK), method, run["r"], run["seed"], run["lr"], run.get("lr_head"),
            run["kd_weight"] if "kd" in method.split("-") else None,
            tuple(decay_knobs(run).values()) if decay else None)


def _collect(finished, path: Path, done: list[dict]) -> None:
    for result in finished:
        print(json.dumps(result), flush=True)
        done.append(result)
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
