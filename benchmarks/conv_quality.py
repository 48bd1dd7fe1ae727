"""Convolutions: DecayLoRA compressing MobileNetV2 on Fashion-MNIST, against full fine-tuning and PEFT LoRA.

The network and data of ``examples/image_classification_conv.py`` (ImageNet MobileNetV2, offline; 6,000 Fashion-MNIST
training images at 64 x 64, the first 2,000 test images), but every *full* convolution adapted: the 3 x 3 stem, every
pointwise expand and project convolution of the 17 inverted-residual blocks and the final 1 x 1 convolution (35
layers, 2.1M parameters; the depthwise ones cannot hold a dense low-rank update). Methods (``--methods``):

- ``full``: every parameter trained (the reference).
- ``lora``: PEFT LoRA (r = 16) on the same convolutions, the head trained in full; keeps ``W``, not compressed.
- ``decaylora-2x`` / ``decaylora-4x``: DecayLoRA with the library's defaults (or with the ``--decaylora`` JSON
  overrides; several are each run) at ``keep_fraction`` 0.5 / 0.25 of each adapted convolution's parameters,
  compressed; ``Conv2d(in, out, k)`` becomes ``Conv2d(in, r, k)`` then
  ``Conv2d(r, out, 1)``.

Every method trains the same epochs with AdamW and a one-cycle schedule (6% warm-up, linear decay), its own learning
rate (``--lr-full``, ``--lr-lora``, ``--lr``). Reported: test accuracy of the final (compressed) network, mean and
spread over seeds, its share of full fine-tuning's, parameters, and CPU latency of a batch of 250 images against the
original network in the same process. Runs are lines of ``--results`` (resumable); the table goes to BENCHMARKS.md.

    python benchmarks/conv_quality.py                        # 3 seeds, about 30 minutes on 2 CPU cores
    python benchmarks/conv_quality.py --decaylora '{}' '{"decay_end": 0.9}'   # the defaults and a later end of W
    python benchmarks/conv_quality.py --seeds 0 --methods full,decaylora-2x --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see the example: shared CPU cores

import torch
import torch.nn.functional as F

import peft_decaylora
from peft_decaylora.schedule import auto_decay_end
from common import REPO, hardware, markdown_table, write_section

from image_classification_conv import (  # noqa: E402
    FULL_CONVOLUTIONS, evaluate, first_batches, latencies, n_params, preprocess, pretrained_mobilenet_v2)
METHODS = {"full": None, "lora": None, "decaylora-2x": 0.5, "decaylora-4x": 0.25}


def build(method: str, base, total_steps: int, overrides: dict, train_norms: bool = False):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    if method == "full":
        return model
    trained = ["classifier"] + ([name for name, module in model.named_modules()
                                 if isinstance(module, torch.nn.BatchNorm2d)] if train_norms else [])
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=FULL_CONVOLUTIONS,
                                                modules_to_save=trained))
    config = peft_decaylora.DecayLoraConfig(target_modules=FULL_CONVOLUTIONS, keep_fraction=METHODS[method],
                                            total_steps=total_steps, modules_to_save=trained, **overrides)
    return get_peft_model(model, config)


def run(method: str, seed: int, overrides: dict, calibration: int, args, data) -> dict:
    train_images, train_labels, test_images, test_labels = data
    torch.manual_seed(seed)
    base = pretrained_mobilenet_v2(10)
    steps_per_epoch = len(train_images) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    model = build(method, base, total_steps, overrides, args.norms)
    lr = {"full": args.lr_full, "lora": args.lr_lora}.get(method, args.lr)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.06,
                                                    anneal_strategy="linear")
    if method.startswith("decaylora"):
        if calibration:  # the activation-aware split (ASVD style) from the first training batches
            peft_decaylora.initialize_from_activations(
                model, first_batches(train_images, calibration, args.batch_size, args.image_size))
        peft_decaylora.attach_schedule(model, optimizer)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_images), generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(preprocess(train_images[idx], args.image_size)), train_labels[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if method == "lora":
        final = model.merge_and_unload()
    elif method.startswith("decaylora"):
        final = model.compress_and_unload()
    else:
        final = model
    latency = latencies({"original": pretrained_mobilenet_v2(10), "final": final}, test_images, args.image_size)
    return {"method": method, "seed": seed, "lr": lr, "config": overrides, "epochs": args.epochs,
            "train_norms": args.norms and method != "full",
            "calibration_batches": calibration,
            "train_size": len(train_images), "image_size": args.image_size,
            "accuracy": evaluate(final, test_images, test_labels, args.image_size),
            "parameters": n_params(final), "original_parameters": n_params(base),
            "latency_ratio": latency["final"] / latency["original"], "seconds": round(seconds, 1),
            "hardware": hardware(), "package": f"peft_decaylora {peft_decaylora.__version__}"}


def summarize(rows: list[dict], methods: list[str]) -> str:
    full = [row["accuracy"] for row in rows if row["method"] == "full"]
    lines = []
    def group(row):
        return (row["method"], json.dumps(row.get("config", {}), sort_keys=True), row.get("train_norms", False),
                row.get("calibration_batches", 0))

    # each method's rows, by config
    for method, config, norms, calibration in sorted({group(row) for row in rows},
                                                     key=lambda g: (methods.index(g[0]), g[2], g[3], g[1])):
        mine = [row for row in rows if group(row) == (method, config, norms, calibration)]
        accuracies = [row["accuracy"] for row in mine]
        spread = f" ({min(accuracies):.3f}-{max(accuracies):.3f})" if len(mine) > 1 else ""
        share = f"{statistics.mean(accuracies) / statistics.mean(full):.1%}" if full and method != "full" else "-"
        knobs = "".join(f", {key} {value}" for key, value in mine[0].get("config", {}).items())
        knobs += ", BatchNorms trained" if norms else ""
        knobs += f", activation-aware split ({calibration} batches)" if calibration else ""
        lines.append([method + knobs, f"{mine[0]['lr']:g}", len(mine), f"{statistics.mean(accuracies):.4f}{spread}",
                      share, f"{mine[0]['parameters']:,}",
                      f"{statistics.median(row['latency_ratio'] for row in mine):.2f}x"])
    return markdown_table(["method", "lr", "seeds", "test accuracy", "of full", "parameters", "CPU latency / original"],
                          lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {list(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="DecayLoRA's learning rate")
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--lr-full", type=float, default=5e-4)
    parser.add_argument("--decaylora", nargs="+", default=["{}"], help="JSON of DecayLoraConfig fields other than the "
                        "defaults; several: each is run")
    parser.add_argument("--norms", action="store_true", help="LoRA and DecayLoRA train the BatchNorm layers too "
                        "(modules_to_save), as full fine-tuning does")
    parser.add_argument("--calibrate", type=int, nargs="+", default=[0], metavar="N", help="DecayLoRA starts from "
                        "the activation-aware split (initialize_from_activations) on N training batches; 0: the plain "
                        "SVD split; several: each is run")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "conv_quality_results.jsonl"))
    parser.add_argument("--no-run", action="store_true", help="only tabulate the runs already in --results")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    from assets import load_fashion_mnist

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:args.train_size]
    data = (train_images[order], train_labels[order].long(), test_images[:args.test_size],
            test_labels[:args.test_size].long())
    setting = {"epochs": args.epochs, "train_size": args.train_size, "image_size": args.image_size}
    path = Path(args.results)
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = [row for row in done if all(row[key] == value for key, value in setting.items())]
    lrs = {"full": args.lr_full, "lora": args.lr_lora}

    # the schedule's end is written into every DecayLoRA row, so that a row keeps its meaning when the default moves
    # (rows made before 0.5 became the default say 0.9)
    default_end = auto_decay_end(causal_lm=False, transformers_model=False)
    configs = [{"decay_end": default_end, **json.loads(text)} for text in args.decaylora]

    def variants(method: str) -> list[tuple[dict, int]]:  # (config, calibration batches) pairs a method runs with
        return [(c, n) for c in configs for n in args.calibrate] if method.startswith("decaylora") else [({}, 0)]

    def asked(row) -> bool:  # the method, lr and (for DecayLoRA) a config and calibration asked for
        return (row["method"] in methods and row["lr"] == lrs.get(row["method"], args.lr)
                and row.get("train_norms", False) == (args.norms and row["method"] != "full")
                and (row.get("config", {}), row.get("calibration_batches", 0)) in variants(row["method"]))

    for seed in seeds:
        for method, (config, calibration) in [(m, v) for m in methods for v in variants(m)]:
            if args.no_run or any((r["seed"], r["method"], r.get("config", {}), r.get("calibration_batches", 0))
                                  == (seed, method, config, calibration) and asked(r) for r in done):
                continue
            row = run(method, seed, config, calibration, args, data)
            print(json.dumps(row), flush=True)
            done.append(row)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    wanted = [r for r in done if r["seed"] in seeds and asked(r)]
    table = summarize(wanted, methods)
    print(table)
    if args.no_write:
        return
    body = (f"### Convolutions: MobileNetV2 on Fashion-MNIST\n\n`python benchmarks/conv_quality.py "
            f"{shlex.join(sys.argv[1:])}`\n\nImageNet MobileNetV2, every full convolution adapted (35 layers); "
            f"{args.train_size} training images at {args.image_size} x {args.image_size}, {args.epochs} epochs, "
            f"{args.test_size} test images; accuracy of the final network (DecayLoRA compressed, LoRA merged), mean "
            f"(min-max) over seeds {seeds}; CPU latency of 250 images against the original network, median over "
            f"seeds. Hardware: {'; '.join(sorted({r['hardware'] for r in wanted}))}.\n\n{table}")
    write_section("conv-quality", body)


if __name__ == "__main__":
    main()
