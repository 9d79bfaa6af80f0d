"""The evaluation classifier: a small MNIST CNN whose features and outputs score the GAN.

    x  (B, 1, 28, 28) in [-1, 1], the generator's tanh range
    a1 = maxpool(relu(bn(conv3x3(x))))        (B, 16, 14, 14)
    a2 = maxpool(relu(bn(conv3x3(a1))))       (B, 32, 7, 7)
    a3 = relu(bn(conv3x3(a2)))                (B, 64, 7, 7)
    f  = relu(W_f flatten(a3) + b_f)          (B, 128)   penultimate features (FID lives here)
    p  = W_p dropout(f) + b_p                 (B, 10)    logits; softmax(p) = p(y | x)

About 0.43 M parameters (1.7 MB of float32) and ~2.3 M multiply-adds per image, so scoring
10,000 images takes seconds on a CPU. ``trainers/classifier.py`` trains it and ships
the weights; ``trainers.classifier.load_classifier`` loads them with their checksum checked.
"""
from __future__ import annotations

from torch import Tensor, nn

NUM_CLASSES = 10      # digits 0-9
FEATURE_DIM = 128     # width of the penultimate layer, the FID feature space


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Conv (same padding, no bias: BatchNorm has one) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MnistCNN(nn.Module):
    """``MnistCNN()``: ``(B, 1, 28, 28)`` in [-1, 1] -> logits ``(B, 10)``;
    ``features(x)`` gives the ``(B, 128)`` penultimate activations and ``head`` maps them to logits."""

    num_features = FEATURE_DIM  # read by torchmetrics' FID to size its statistics

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.trunk = nn.Sequential(
            conv_bn_relu(1, 16, 3), nn.MaxPool2d(2),     # (B, 16, 14, 14)
            conv_bn_relu(16, 32, 3), nn.MaxPool2d(2),    # (B, 32, 7, 7)
            conv_bn_relu(32, 64, 3),                     # (B, 64, 7, 7)
            nn.Flatten(),                                # (B, 3136)
            nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(inplace=True),  # (B, 128)
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)                 # (B, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))   # (B, 10) logits
