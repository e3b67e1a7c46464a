"""The image classifiers' shared part: data (digits 8×8, Fashion-MNIST 28×28), training, scoring.

:class:`ImageClassifier` is the problem of the MLP and the CNN: minibatch cross-entropy on the
training split; the target is the accuracy on the validation split, the final quality the accuracy
on the test split. Splits are fixed (seed 0, whatever the run's seed): digits (1,797 images) 400
validation, 400 test, 997 training; Fashion-MNIST: 5,000 validation images drawn from the official
60,000 training images, the official 10,000-image test set, the remaining 55,000 (or the first
``train_subset`` of them) for training. A subclass only builds its network.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from curvlab.bench.problems.base import (
    Problem,
    ProblemInstance,
    Target,
    epoch_sampler,
    split_indices,
)
from curvlab.datasets import digits, fashion_mnist, fashion_mnist_arrays, fashion_mnist_available
from curvlab.errors import DataNotFoundError

__all__ = ["ImageClassifier", "accuracy_eval", "check_image_data", "image_data"]


Splits = dict[str, tuple[Tensor, Tensor]]


@lru_cache(maxsize=4)
def _digits() -> Splits:
    images, labels = digits()
    x = images.reshape(-1, 1, 8, 8)
    train, valid, test = split_indices(len(labels), 400, 400)
    mean, std = float(x[train].mean()), float(x[train].std())
    x = (x - mean) / std
    return {k: (x[i], labels[i]) for k, i in (("train", train), ("valid", valid), ("test", test))}


@lru_cache(maxsize=2)
def _fashion(train_subset: int | None) -> Splits:
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    train, valid = split_indices(len(ytr) + 1, 5000, 1)[:2]  # index n is never drawn
    train = train[train < len(ytr)][:train_subset]
    mean, std = 0.2860, 0.3530
    xtr, xte = ((xtr - mean) / std).unsqueeze(1), ((xte - mean) / std).unsqueeze(1)
    return {
        "train": (xtr[train], ytr[train]),
        "valid": (xtr[valid], ytr[valid]),
        "test": (xte, yte),
    }


def image_data(dataset: str, train_subset: int | None = None) -> Splits:
    """``{"train" | "valid" | "test": (x [n,1,h,w], y [n])}``, standardised (digits, fashion-mnist)."""
    if dataset == "digits":
        return _digits()
    if dataset == "fashion-mnist":
        return _fashion(train_subset)
    raise DataNotFoundError(f"unknown image data set {dataset!r}; known: digits, fashion-mnist")


def check_image_data(dataset: str) -> None:
    """Raise DataNotFoundError (with how-to) if the data set's files are absent."""
    if dataset == "fashion-mnist" and not fashion_mnist_available():
        fashion_mnist_arrays()  # raises with the how-to message


def accuracy_eval(
    model: torch.nn.Module, x: Tensor, y: Tensor, chunk: int = 2000
) -> dict[str, float]:
    """Accuracy and cross-entropy of ``model`` on ``(x, y)``, in chunks, without grad."""
    model.eval()
    correct = 0
    loss = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i : i + chunk])
            correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
            loss += float(
                torch.nn.functional.cross_entropy(logits, y[i : i + chunk], reduction="sum")
            )
    model.train()
    n = x.shape[0]
    return {"accuracy": correct / n, "loss": loss / n}


@dataclass
class ImageClassifier(Problem):
    """An image classifier on ``dataset`` trained by minibatch cross-entropy; target: validation
    accuracy; final quality: test accuracy.

    Subclasses implement :meth:`network`; inputs are ``[n, 1, h, w]`` images, flattened to
    ``[n, h*w]`` first when the subclass sets ``flatten_inputs = True``.
    """

    dataset: str = "digits"
    batch_size: int = 64
    train_subset: int | None = None
    data: str = "scikit-learn"
    budget_steps: int = 300
    eval_every: int = 25
    target: Target = field(default_factory=lambda: Target("valid_accuracy", higher_is_better=True))
    splits: dict[str, str] = field(
        default_factory=lambda: {
            "train": "the images the held-out parts leave (fixed split, seed 0)",
            "valid": "digits: 400 images; fashion-mnist: 5,000 of the official training images",
            "test": "digits: 400 other images; fashion-mnist: the official 10,000 test images",
        }
    )

    flatten_inputs = False

    @abstractmethod
    def network(self, input_shape: tuple[int, ...], generator: torch.Generator) -> torch.nn.Module:
        """The network for inputs of ``input_shape`` (one example), initialised from ``generator``."""

    def check_data(self) -> None:
        check_image_data(self.dataset)

    def build(self, seed: int) -> ProblemInstance:
        data = image_data(self.dataset, self.train_subset)
        if self.flatten_inputs:
            data = {k: (x.flatten(1), y) for k, (x, y) in data.items()}
        xtr, ytr = data["train"]
        gen = torch.Generator().manual_seed(seed)
        model = self.network(tuple(xtr.shape[1:]), gen)

        def evaluate() -> dict[str, float]:
            return {
                f"{split}_{name}": value
                for split in ("valid", "test")
                for name, value in accuracy_eval(model, *data[split]).items()
            }

        return ProblemInstance(
            model=model,
            loss_fn=torch.nn.functional.cross_entropy,
            next_batch=epoch_sampler(xtr, ytr, self.batch_size, gen),
            evaluate=evaluate,
            outputs_are_logits=True,
        )
