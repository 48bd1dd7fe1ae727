"""Shared pieces of the benchmarks: the offline model and data, timing, and the BENCHMARKS.md report."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from assets import load_rotten_tomatoes, minilm_path  # noqa: E402

REPORT = REPO / "BENCHMARKS.md"
MINILM_TARGETS = ["query", "key", "value", "dense"]  # every encoder Linear (and the pooler)


def load_minilm(model_name: str | None = None, num_labels: int = 2):
    """all-MiniLM-L6-v2 (offline package) or a Hub name, with a new classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = model_name or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    return model, tokenizer


def text_batch(tokenizer, batch_size: int, max_length: int = 64, split: str = "test", source: str | None = None) -> dict:
    """A batch of real Rotten Tomatoes snippets, padded to ``max_length`` tokens (fixed shape for timing)."""
    texts = load_rotten_tomatoes(source=source)[split]["text"][:batch_size]
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


def median_time(fn, repeats: int, device: str = "cpu") -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hardware(device: str = "cpu") -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers of BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\nEvery table is written by the command above it.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    REPORT.write_text(text)
    print(f"wrote section '{name}' of {REPORT}")


def report(section: str, script: str, args, title: str, description: str, table: str) -> None:
    """Print ``table`` and, unless ``--no-write``, put it with its command and hardware into BENCHMARKS.md."""
    print(table)
    command = f"python benchmarks/{script}" + (f" --device {args.device}" if args.device != "cpu" else "")
    body = f"### {title} ({args.device})\n\n`{command}`: {description}\nHardware: {hardware(args.device)}.\n\n{table}"
    if not args.no_write:
        write_section(f"{section}-{args.device}", body)
