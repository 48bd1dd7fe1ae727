"""Forward + backward time of a DecayLoRA Conv2d block against PEFT's LoRA Conv2d on the same block and input.

Both models are built in the same process from the same weights; runs are interleaved and the median over
repetitions is reported, per DecayLoRA phase (warm-up, decay with noise, decay without noise, d = 0), as a ratio to
LoRA. Targets (issue 3): at most 1.2x during the noise phase and at most 1.05x after it.

    python benchmarks/conv_block.py                 # CPU defaults
    python benchmarks/conv_block.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_decaylora  # noqa: F401
from common import markdown_table, median_time, report
from peft_decaylora import DecayLoraConfig

PHASES = {"warm-up (d=1)": 0, "decay + noise (d=0.5)": 50, "decay, no noise (d=0.2)": 80, "d=0": 100}


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with a ReLU, as in a VGG / ResNet stage."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def step_time(model, x, repeats: int, device: str) -> list[float]:
    return [median_time(lambda: model(x).square().mean().backward(), 1, device) for _ in range(repeats)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="steps per model per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    block = ConvBlock(args.channels).to(args.device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device)
    targets = ["conv1", "conv2"]
    lora = get_peft_model(copy.deepcopy(block), LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets))
    config = DecayLoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets, total_steps=100, noise="vanish")
    decay = get_peft_model(copy.deepcopy(block), config)
    lora.train(), decay.train()
    for model in (lora, decay):  # warm up kernels and allocator
        step_time(model, x, 2, args.device)

    rows = []
    for phase, step in PHASES.items():
        decay.base_model.set_step(step)
        lora_times, decay_times = [], []
        for _ in range(args.rounds):
            lora_times += step_time(lora, x, args.repeats, args.device)
            decay_times += step_time(decay, x, args.repeats, args.device)
        lora_ms, decay_ms = 1e3 * statistics.median(lora_times), 1e3 * statistics.median(decay_times)
        rows.append([phase, f"{lora_ms:.2f}", f"{decay_ms:.2f}", f"{decay_ms / lora_ms:.3f}"])
    table = markdown_table(["phase", "LoRA ms", "DecayLoRA ms", "ratio"], rows)
    description = (
        f"2 x Conv2d({args.channels}, {args.channels}, 3), input {tuple(x.shape)}, r={args.r}; median of "
        f"{args.rounds} interleaved rounds of {args.repeats}. Targets: <= 1.2x with noise, <= 1.05x after."
    )
    report("conv-block", "conv_block.py", args, "Conv2d block, forward + backward, against PEFT LoRA", description,
           table)


if __name__ == "__main__":
    main()
