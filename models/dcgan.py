"""The DCGAN of the report, for 28x28 MNIST, with its channel bug fixed.

    G: z (B, 100, 1, 1) -> ConvT 4x4 -> 8x8 -> 16x16 -> 32x32 -> dilated Conv 28x28 -> Conv -> tanh
    D: x (B, 1, 28, 28) -> Conv 14x14 -> 7x7 -> 3x3 -> 1x1 -> 1x1 Conv -> logit

``b`` is ``base_channels`` (128 in the report). The report's dilated conv maps b -> 1 channel
and then normalises b channels, which cannot run; here it maps b -> b, as its BatchNorm and
the following b -> 1 conv require. D returns a logit (no sigmoid), so the loss is
``BCEWithLogits``, which is safe under autocast. Weights start from N(0, 0.02) (BatchNorm:
weight N(1, 0.02), bias 0), as in Radford et al.
"""
from __future__ import annotations

from torch import Tensor, nn

LATENT_DIM = 100   # the report's z size
IMAGE_CHANNELS = 1  # MNIST is greyscale


def block(layer: nn.Module, channels: int) -> list[nn.Module]:
    """layer -> BatchNorm -> LeakyReLU(0.2), the unit both networks are built from."""
    return [layer, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]


class Generator(nn.Module):
    """``Generator(latent_dim, base_channels)``: z ``(B, latent_dim)`` -> images ``(B, 1, 28, 28)`` in [-1, 1]."""

    def __init__(self, latent_dim: int = LATENT_DIM, base_channels: int = 128):
        super().__init__()
        b = base_channels
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            *block(nn.ConvTranspose2d(latent_dim, 8 * b, 4, 1, 0, bias=False), 8 * b),  # (B, 8b, 4, 4)
            *block(nn.ConvTranspose2d(8 * b, 4 * b, 4, 2, 1, bias=False), 4 * b),       # (B, 4b, 8, 8)
            *block(nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1, bias=False), 2 * b),       # (B, 2b, 16, 16)
            *block(nn.ConvTranspose2d(2 * b, b, 4, 2, 1, bias=False), b),               # (B, b, 32, 32)
            *block(nn.Conv2d(b, b, 3, 1, 0, dilation=2, bias=False), b),                # (B, b, 28, 28)
            nn.Conv2d(b, IMAGE_CHANNELS, 3, 1, 1),                                      # (B, 1, 28, 28)
            nn.Tanh(),
        )
        dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))   # (B, latent) -> (B, 1, 28, 28)


class Discriminator(nn.Module):
    """``Discriminator(base_channels)``: images ``(B, 1, 28, 28)`` -> logits ``(B,)`` of "real"."""

    def __init__(self, base_channels: int = 128):
        super().__init__()
        b = base_channels
        self.net = nn.Sequential(
            *block(nn.Conv2d(IMAGE_CHANNELS, b, 4, 2, 1, bias=False), b),  # (B, b, 14, 14)
            *block(nn.Conv2d(b, 2 * b, 4, 2, 1, bias=False), 2 * b),       # (B, 2b, 7, 7)
            *block(nn.Conv2d(2 * b, 4 * b, 4, 2, 1, bias=False), 4 * b),   # (B, 4b, 3, 3)
            *block(nn.Conv2d(4 * b, 8 * b, 3, 1, 0, bias=False), 8 * b),   # (B, 8b, 1, 1)
            nn.Conv2d(8 * b, 1, 1),                                        # (B, 1, 1, 1)
        )
        dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()   # (B,) logits; sigmoid(logit) = D(x)


def dcgan_init(model: nn.Module) -> None:
    """Conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0; conv biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
