"""A user's own model for `curvlab spectrum --model tests.cli.user_model:build`."""

import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.CrossEntropyLoss(), (torch.randn(16, 4), torch.randint(0, 3, (16,)))
