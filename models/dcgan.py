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

import time

import torch
import torch.distributed as dist
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

LATENT_DIM = 100   # the report's z size
IMAGE_CHANNELS = 1  # MNIST is greyscale


def block(layer: nn.Module, channels: int) -> list[nn.Module]:
    """layer -> BatchNorm -> LeakyReLU(0.2), the unit both networks are built from."""
    return [layer, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]


class Generator(nn.Module, PyTorchModelHubMixin, library_name="palgan", tags=["dcgan", "mnist"]):
    """``Generator(latent_dim, base_channels)``: z ``(B, latent_dim)`` -> images ``(B, 1, 28, 28)`` in [-1, 1].

    ``save_pretrained(folder)`` / ``Generator.from_pretrained(folder)`` (huggingface_hub's mixin):
    config.json (the arguments above) and model.safetensors."""

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


# --- BatchNorm over several processes ----------------------------------------------------------

# Seconds this process spent in GlobalBatchNorm2d's all-reduces (waiting for the other ranks
# included), and how many it made: benchmarks/scaling.py reports their share of an iteration.
ALL_REDUCE_STATS = {"seconds": 0.0, "calls": 0}


def _timed_all_reduce(t: Tensor) -> None:
    tick = time.perf_counter()
    dist.all_reduce(t)
    ALL_REDUCE_STATS["seconds"] += time.perf_counter() - tick
    ALL_REDUCE_STATS["calls"] += 1


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        _timed_all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        _timed_all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of all processes.

    The per-channel sums of x and x^2 and the count are all-reduced by ``AllReduceSum``, so
    the backward pass sums the statistics' gradients over ranks too, as ``nn.SyncBatchNorm`` does. DDP accepts ``nn.SyncBatchNorm``
    on CUDA only; this runs on any backend (gloo on CPU). Running stats are updated from the
    global statistics, so they are equal on every rank. With one process it is BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()                                                     # (B, C, H, W)
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_tensor([xf.numel() // C])])              # (2C + 1,)
        total = AllReduceSum.apply(local)                                         # summed over ranks
        n = total[-1]
        mean = total[:C] / n                                               # (C,)
        var = (total[C:2 * C] / n - mean * mean).clamp_min(0)              # biased, (C,)
        self._update_running_stats(mean.detach(), var.detach(), n.item())
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: float) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), momentum)


def synchronise_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """BatchNorm over the global batch when training with several processes: ``nn.SyncBatchNorm``
    on CUDA, ``GlobalBatchNorm2d`` elsewhere (DDP rejects SyncBatchNorm off CUDA)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats).to(child.weight.device)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            synchronise_batchnorm(child, device_type)
    return model
