"""What a checkpoint costs at the paper's sizes: time to capture and write it, time to load it
back, and its size on disk.

The models are the ones the harness trains, built through the estimator plugins with the paper
preset's settings, after one optimiser step (so that Adam's moments exist, as in any checkpoint
after the first step): identity at n = 64 (the sparse layer, a_l = 2, a_g = 10, region (6, 6)),
attention on a 100 x 100 canvas (the Table 2 source network with sparse glimpses, both of the
paper's variants), sorting at n = 16 (the Table 3 key network with sparse quicksort). Task state
is included at its real size (identity's generator; attention's shuffled order of 60,000 images).

    PYTHONPATH=. python benchmarks/bench_checkpoint.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from estimators.base import GlimpseSpec
from estimators.plugins.sparse import SparseEstimator
from harness.store.checkpoint import LocalCheckpoints, training_state
from plugins.attention import AttentionModel, per_sample_loss
from plugins.identity import IdentityTask
from plugins.sorting import KeyNetwork, SortingModel, SortingTask

CPU = torch.device("cpu")
SPARSE = SparseEstimator()


def _stepped(model: torch.nn.Module, loss: Callable[[], torch.Tensor], lr: float) -> torch.optim.Optimizer:
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss().backward()
    optimiser.step()
    return optimiser


def identity() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    params = {**SPARSE.defaults, "a_l": 2, "a_g": 10, "region": [6, 6]}
    layer = SPARSE.build(IdentityTask().spec("sparse_matrix", {"n": 64}), params)
    x = torch.randn(64, 64)
    optimiser = _stepped(layer, lambda: ((layer(x) - x) ** 2).mean(), 1e-3)
    return layer, optimiser, {"train_gen": torch.Generator().manual_seed(0).get_state()}


def attention(glimpses: int, size: int) -> Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, dict]]:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
        spec = GlimpseSpec((1, 100, 100), size=size, glimpses=glimpses)
        layer = SPARSE.build(spec, {**SPARSE.defaults, "a_l": 32, "a_g": 16, "region": [20, 20]})
        model = AttentionModel(spec, layer, hidden=128)
        images, labels = torch.rand(2, 1, 100, 100), torch.tensor([3, 7])
        optimiser = _stepped(model, lambda: per_sample_loss(model(images).logits, labels, "ce").mean(), 1e-4)
        order = torch.randperm(60_000)  # _Batches' order over the paper's training set
        task = {"batches": {"generator": torch.Generator().get_state(), "epoch": 0, "order": order}}
        return model, optimiser, {**task, "grid_written": True}

    return build


def sorting() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    spec = SortingTask().spec("permutation", {"n": 16})
    model = SortingModel(KeyNetwork(3), SPARSE.build(spec, dict(SPARSE.defaults)))
    images = torch.rand(2, 16, 3, 28, 28)
    optimiser = _stepped(model, lambda: model(images)[1].matrix.sum(), 5e-5)
    return model, optimiser, {}


CASES = {
    "identity n=64, sparse": identity,
    "attention 100x100 1x32x32, sparse": attention(1, 32),
    "attention 100x100 8x12x12, sparse": attention(8, 12),
    "sorting n=16 (3 digits), sparse quicksort": sorting,
}


def measure(build: Callable, repeats: int) -> tuple[int, int, float, float, float]:
    model, optimiser, task = build()
    params = sum(p.numel() for p in model.parameters())
    pending = [(s, {"train/loss": 0.5, "train/error_pct": 50.0}) for s in range(0, 5000, 10)]
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalCheckpoints(tmp)
        for step in range(repeats):
            start = time.perf_counter()
            state = training_state(
                cell_id="bench", step=step, elapsed_s=0.0, model=model, optimiser=optimiser, task=task,
                device=CPU, pending=pending, last_eval={"test/error_pct": 50.0},
            )  # fmt: skip
            store.save("bench", state)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            store.load("bench", CPU)
            loads.append(time.perf_counter() - start)
        size = store.path("bench").stat().st_size
    return params, size, statistics.median(saves), min(saves), statistics.median(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    header = ("params", "file MB", "save s (median)", "save s (best)", "load s")
    print(f"{'cell':44} {header[0]:>11} {header[1]:>8} {header[2]:>16} {header[3]:>14} {header[4]:>8}")
    for name, build in CASES.items():
        params, size, save, best, load = measure(build, args.repeats)
        print(f"{name:44} {params:>11,} {size / 2**20:>8.2f} {save:>16.3f} {best:>14.3f} {load:>8.3f}")


if __name__ == "__main__":
    main()
