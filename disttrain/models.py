"""Frame classifiers: the seed experiment's LSTM acoustic model and a small MLP for fast tests.

Both map features ``[B, T, F]`` to per-frame logits ``[B, T, K]``.
"""
from __future__ import annotations

import torch
from torch import nn


class LSTMAcousticModel(nn.Module):
    """A stack of LSTM layers and a linear output layer applied to every frame.

    The seed experiment's student is a 5-layer unidirectional LSTM (24M
    parameters), its teacher a 5-layer bidirectional one (78M); the defaults
    here are a small version of the student.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 128, layers: int = 2,
                 bidirectional: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        for key, value in (("hidden", hidden), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        self.lstm = nn.LSTM(input_dim, hidden, num_layers=layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.output = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(features)
        return self.output(hidden)


class FrameMLP(nn.Module):
    """Frame-by-frame MLP (no context): fast, for tests and quick checks."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        for key, value in (("hidden", hidden), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        dims = [input_dim] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.Tanh()]
        blocks.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def frame_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every frame of the batch."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> tuple[float, float]:
    """(mean frame cross-entropy, frame accuracy) over a held-out set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, frames = 0.0, 0, 0
    for start in range(0, features.shape[0], batch_size):
        x = features[start: start + batch_size].to(device)
        y = labels[start: start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      y.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        frames += y.numel()
    model.train(was_training)
    return loss_sum / frames, correct / frames
