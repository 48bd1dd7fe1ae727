"""Shared fixtures: tiny random-init models (unit tests only; examples use real pretrained weights)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import peft_decaylora  # noqa: F401  (registers DECAYLORA)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=32, num_labels=2)
    config = BertConfig(**{**sizes, **overrides})
    return BertForSequenceClassification(config).eval()


class TwoLayerNet(nn.Module):
    """A plain PyTorch model with Linear layers, with and without bias, whose weights have distinct row statistics."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(24, 40)
        self.lin1 = nn.Linear(40, 16, bias=False)
        with torch.no_grad():
            rows = torch.linspace(0.5, 3.0, 40)[:, None]
            self.lin0.weight.copy_(torch.randn(40, 24) * rows * 0.1 + 0.05 * rows)
            self.lin0.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 64, (3, 9))
