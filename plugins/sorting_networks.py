"""The scoring networks of the sorting task, one per protocol.

Both read a batch of instances, ``images: (b, n, digits, 28, 28)`` (the digits of every number,
most significant first), apply the same network to every number and return ``scores`` per item:
``(b, n)`` when ``scores == 1`` (a key) and ``(b, n, scores)`` otherwise (Gumbel-Sinkhorn as Mena
et al. 2018 reads one score per output position, so the task asks for ``scores = n``).

- ``KeyNetwork``: Bloem et al. 2018, Table 3. A ConvNet shared by all digits (8 features each),
  an MLP over a number's digits.
- ``LargeMnistCNN``: Grover et al. 2019, appendix D.1 and ``tf/multi_mnist_cnn.py`` of
  ermongroup/neuralsort. The digits of a number stacked into one ``(digits * 28) x 28`` image
  (most significant on top, as ``tf/mnist_input.py`` builds it), two 5x5 conv + 2x2 max-pool
  stages, a 64-unit ReLU layer and a linear head. Weights start as in that code: truncated normal
  (std 0.1, cut at two std, as ``tf.truncated_normal``), biases 0.1.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FEATURES", "KeyNetwork", "LargeMnistCNN"]

FEATURES = 8  # per-digit ConvNet output size (Table 3)
_SIDE = 28


def _check(images: torch.Tensor, digits: int) -> None:
    if images.dim() != 5 or images.shape[2] != digits or images.shape[3:] != (_SIDE, _SIDE):
        raise ValueError(
            f"images must be (batch, n, {digits}, 28, 28), got {tuple(images.shape)}"
        )


def _per_item(out: torch.Tensor, b: int, n: int, scores: int) -> torch.Tensor:
    """``(b n, scores)`` -> ``(b, n)`` for one score per item, else ``(b, n, scores)``."""
    return out.view(b, n) if scores == 1 else out.view(b, n, scores)


def _conv_block(c_in: int, c: int) -> list[nn.Module]:
    """Three 3x3 convolutions, BatchNorm, 2x2 max-pool; the bias of the conv before BN is off."""
    return [
        nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(),
        nn.BatchNorm2d(c),
        nn.MaxPool2d(2),
    ]


class KeyNetwork(nn.Module):
    """Table 3: a ConvNet shared by all digits (-> 8 features each), an MLP over a number's digits.

    ``forward(images: (b, n, digits, 28, 28)) -> (b, n)`` keys, or ``(b, n, scores)``. The paper's
    MLP ends in one unit (a key); a head of ``scores`` units serves position-scoring layers.
    """

    def __init__(self, digits: int, scores: int = 1):
        super().__init__()
        self.digits, self.scores = digits, scores
        self.convnet = nn.Sequential(
            *_conv_block(1, 16),  # 28 -> 14
            *_conv_block(16, 64),  # 14 -> 7
            *_conv_block(64, 128),  # 7 -> 3
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, FEATURES),
        )
        self.mlp = nn.Sequential(
            nn.Linear(FEATURES * digits, 256), nn.ReLU(),
            nn.Linear(256, scores),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check(images, self.digits)
        b, n, d = images.shape[:3]
        feats = self.convnet(images.reshape(b * n * d, 1, _SIDE, _SIDE))  # (b n d, 8)
        return _per_item(self.mlp(feats.view(b * n, d * FEATURES)), b, n, self.scores)


class LargeMnistCNN(nn.Module):
    """Grover et al. 2019, D.1: one CNN over each number's whole ``(digits * 28) x 28`` image.

    ``forward(images: (b, n, digits, 28, 28)) -> (b, n)`` scores, or ``(b, n, scores)``.
    """

    def __init__(self, digits: int, scores: int = 1):
        super().__init__()
        self.digits, self.scores = digits, scores
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(),  # SAME padding, stride 1
            nn.MaxPool2d(2),  # (28 d) x 28 -> (14 d) x 14
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2),  # -> (7 d) x 7
            nn.Flatten(),
            nn.Linear(digits * 7 * 7 * 64, 64), nn.ReLU(),
            nn.Linear(64, scores),
        )
        for module in self.net:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(module.bias, 0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check(images, self.digits)
        b, n, d = images.shape[:3]
        stacked = images.reshape(b * n, 1, d * _SIDE, _SIDE)  # digits top to bottom
        return _per_item(self.net(stacked), b, n, self.scores)
