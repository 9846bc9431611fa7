"""Train the feature extractor the package ships for ``digits`` or ``mnist5k`` and write it into the package as
``lightning_dpgan/metrics/weights/<dataset>.{pt,json}`` (a maintainer's tool: the package only loads them).

    python benchmarks/train_extractor.py digits
    python benchmarks/train_extractor.py mnist5k

A seeded 80/20 split of the dataset's real images; the JSON records the held-out accuracy. Seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from lightning_dpgan.metrics.extractor import EXTRACTOR_DATASETS, NUM_FEATURES, DigitClassifier, weights_file


def real_images(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_dpgan.data import DigitsDataModule, MNIST5kDataModule

    module = DigitsDataModule() if dataset == "digits" else MNIST5kDataModule()
    data, _ = module.load()
    return data.tensors[0], data.tensors[1]


def train(dataset: str, epochs: int, seed: int = 0) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    x, y = real_images(dataset)
    order = torch.randperm(len(y))
    cut = int(0.8 * len(y))
    train_idx, test_idx = order[:cut], order[cut:]
    model = DigitClassifier(EXTRACTOR_DATASETS[dataset])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for batch in train_idx[torch.randperm(len(train_idx))].split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=list(EXTRACTOR_DATASETS))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    model, accuracy = train(args.dataset, args.epochs)
    path = weights_file(args.dataset)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    report = {
        "dataset": args.dataset,
        "held_out_accuracy": round(accuracy, 4),
        "num_features": NUM_FEATURES,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs,
        "split": "seeded 80/20 of the dataset's real images (torch.manual_seed(0))",
        "command": f"python benchmarks/train_extractor.py {args.dataset} --epochs {args.epochs}",
    }
    with open(path.removesuffix(".pt") + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
