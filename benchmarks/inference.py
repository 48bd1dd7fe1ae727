"""Inference of the compressed model against the original dense model: latency, parameters, size on disk.

For each rank, a DecayLoRA model of all-MiniLM-L6-v2 (offline) is taken to the end of its schedule (d = 0) and
compressed with ``compress_and_unload()``; it is timed against the dense original in the same process, at batch 1
and batch 32 (64 tokens each), in eval mode without gradients, interleaved, median of the rounds. Speed does not
depend on what the factors learned, so the adapters here are untrained (random ``B``); ``benchmarks/quality.py``
measures accuracy.

The default ranks give about 2x, 4x and 8x fewer parameters in the adapted layers (every encoder Linear).
Target (issue 6): at least 1.3x lower end-to-end latency at 2x adapted-layer compression.

    python benchmarks/inference.py                 # CPU, writes the table into BENCHMARKS.md
    python benchmarks/inference.py --device cuda   # GPU rows
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model

import peft_decaylora  # noqa: F401
from common import MINILM_TARGETS, load_minilm, markdown_table, median_time, report, text_batch
from peft_decaylora import DecayLoraConfig, DecayLoraLayer, save_compressed


def directory_size(directory) -> int:
    """Total size in bytes of the files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def adapted_parameters(model, names) -> int:
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def compressed_model(base, r: int):
    config = DecayLoraConfig(r=r, lora_alpha=r, target_modules=MINILM_TARGETS, total_steps=10, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    model.base_model.set_step(10)
    names = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, DecayLoraLayer)]
    return model.compress_and_unload().eval(), names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub name instead of the packaged all-MiniLM-L6-v2")
    parser.add_argument("--ranks", default="128,64,32", help="comma-separated ranks")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="a csv (text, label/category) instead of the packaged corpus")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = parser.parse_args()

    dense, tokenizer = load_minilm(args.model)
    dense.to(args.device).eval()
    batches = {b: {k: v.to(args.device) for k, v in text_batch(tokenizer, b, args.max_length, source=args.data).items()}
               for b in map(int, args.batches.split(","))}
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(f"{tmp}/dense")
        dense_size = directory_size(f"{tmp}/dense")
    rows = []
    for r in map(int, args.ranks.split(",")):
        compressed, names = compressed_model(dense.cpu(), r)
        dense.to(args.device)
        compressed.to(args.device)
        with tempfile.TemporaryDirectory() as tmp:
            compressed_size = directory_size(save_compressed(compressed, f"{tmp}/compressed"))
        ratio_adapted = adapted_parameters(dense, names) / adapted_parameters(compressed, names)
        row = [r, f"{ratio_adapted:.2f}x", f"{sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M",
               f"{sum(p.numel() for p in compressed.parameters()) / 1e6:.2f}M",
               f"{dense_size / 2**20:.1f} / {compressed_size / 2**20:.1f}"]
        for b, batch in batches.items():
            times = {"dense": [], "compressed": []}
            with torch.inference_mode():
                for model in (dense, compressed):
                    median_time(lambda: model(**batch), 2, args.device)
                for _ in range(args.rounds):
                    for name, model in (("dense", dense), ("compressed", compressed)):
                        times[name].append(median_time(lambda: model(**batch), args.repeats, args.device))
            t_dense, t_comp = (sorted(times[n])[len(times[n]) // 2] for n in ("dense", "compressed"))
            row += [f"{t_dense * 1e3:.2f} / {t_comp * 1e3:.2f}", f"{t_dense / t_comp:.2f}x"]
        rows.append(row)
        print(row)
    header = ["rank", "adapted-layer compression", "params dense", "params compressed", "disk MiB dense / compressed"]
    for b in batches:
        header += [f"batch {b} ms dense / compressed", f"speed-up b{b}"]
    table = markdown_table(header, rows)
    description = (
        f"all-MiniLM-L6-v2, every encoder Linear compressed ({', '.join(MINILM_TARGETS)}), {args.max_length} tokens "
        f"per example, eval mode, no gradients, median of {args.rounds} interleaved rounds of {args.repeats}."
    )
    report("inference", "inference.py", args, "Inference of the compressed model", description, table)


if __name__ == "__main__":
    main()
