"""Student training through the client: the distillation papers' evaluation protocol.

A student learns from a served label set with a bundled loss, and is scored top-1 on a
real test split. AdamW (lr 1e-3, weight decay 1e-4) with the learning rate divided by 10 at
2/3 and 5/6 of training follows the official GIFT evaluator; Adam and SGD are there for
the cross-optimizer study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from softserve.client import NEEDS_LOGITS, Client, RemoteLabelSet, get_loss
from softserve.errors import InputError
from softserve.models import convnet, resnet18_small

MODELS = ("convnet", "resnet18")
OPTIMIZERS = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.01}


@dataclass
class TrainOptions:
    urls: Sequence[str]
    labelset: str
    model: str = "convnet"
    loss: str = "gift"
    optimizer: str = "adamw"
    epochs: int = 300
    lr: float | None = None
    weight_decay: float = 1e-4
    batch_size: int = 64
    eval: str = "fashion-mnist"
    device: str = "auto"
    token: str | None = None
    seed: int = 0
    prefetch: int = 8
    progress: bool = True


def build_student(name: str, labelset: RemoteLabelSet) -> nn.Module:
    """A fresh student for the label set's channels, view size and classes."""
    channels = labelset.image_shape[0]
    if name == "convnet":
        return convnet(labelset.num_classes, channels, image_size=labelset.output_size)
    if name == "resnet18":
        return resnet18_small(labelset.num_classes, channels)
    raise InputError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")


def build_optimizer(opts: TrainOptions, params) -> torch.optim.Optimizer:
    if opts.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown --optimizer {opts.optimizer!r}; use {', '.join(OPTIMIZERS)}")
    lr = opts.lr if opts.lr is not None else OPTIMIZERS[opts.optimizer]
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opts.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opts.weight_decay)


def load_eval_set(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Test images (uint8 N×C×H×W) and labels: ``fashion-mnist`` or an image set path."""
    if spec == "fashion-mnist":
        from softserve.worker import fashion_mnist

        return fashion_mnist.load_split(fashion_mnist.find_data(), "test")
    from softserve.worker.sources import load_image_set

    data = load_image_set(Path(spec))
    return data.images, data.labels


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, labelset: RemoteLabelSet,
    device: torch.device,
) -> float:  # fmt: skip
    """Top-1 accuracy on whole images, resized to the view size and normalized."""
    model.eval()
    mean = torch.tensor(labelset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(labelset.std, device=device).view(1, -1, 1, 1)
    correct = 0
    for start in range(0, len(images), 1024):
        x = torch.from_numpy(images[start : start + 1024]).to(device).float() / 255
        if tuple(x.shape[2:]) != tuple(labelset.output_size):
            x = F.interpolate(x, size=labelset.output_size, mode="bilinear", align_corners=False)
        pred = model((x - mean) / std).argmax(1).cpu().numpy()
        correct += int((pred == labels[start : start + 1024]).sum())
    model.train()
    return correct / len(images)


def train(opts: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train a student from the server and score it; returns the result record."""
    from softserve.worker.runtime import resolve_device

    device = resolve_device(opts.device)
    if opts.epochs < 1 or opts.batch_size < 1:
        raise InputError("--epochs and --batch-size must be positive")
    try:
        loss_fn = get_loss(opts.loss)
    except ValueError as exc:
        raise InputError(f"--loss: {exc}") from None
    test_images, test_labels = load_eval_set(opts.eval)
    torch.manual_seed(opts.seed)
    with Client(list(opts.urls), token=opts.token) as client:
        labelset = client.labelset(opts.labelset)
        if test_images.shape[1] != labelset.image_shape[0]:
            raise InputError(
                f"--eval images have {test_images.shape[1]} channels, "
                f"the label set {labelset.image_shape[0]}"
            )
        model = build_student(opts.model, labelset).to(device)
        optimizer = build_optimizer(opts, model.parameters())
        loader = labelset.loader(
            opts.batch_size, epochs=opts.epochs, device=device,
            logits=opts.loss in NEEDS_LOGITS, prefetch=opts.prefetch,
        )  # fmt: skip
        steps = opts.epochs * loader.batches_per_epoch
        if steps == 0:
            raise InputError(
                f"--batch-size {opts.batch_size} exceeds the label set's "
                f"{labelset.num_samples} samples; lower it"
            )
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[steps * 2 // 3, steps * 5 // 6], gamma=0.1
        )
        bar = tqdm(
            total=steps, unit="step", desc=f"train {opts.model}/{opts.loss}",
            disable=not opts.progress, dynamic_ncols=True,
        )  # fmt: skip
        started = time.perf_counter()
        samples = 0
        model.train()
        for batch in loader:
            loss = loss_fn(model(batch.images), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            samples += len(batch)
            bar.update()
            if bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - started
        top1 = evaluate(model, test_images, test_labels, labelset, device)
    return {
        "labelset": opts.labelset,
        "model": opts.model,
        "loss": opts.loss,
        "optimizer": opts.optimizer,
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "steps": steps,
        "top1": round(top1, 4),
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
        "device": str(device),
    }
