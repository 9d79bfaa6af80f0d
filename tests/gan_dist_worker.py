"""One rank of the GlobalBatchNorm2d check in tests/test_gan.py (kept small: spawned processes import it)."""
import os

import torch
import torch.distributed as dist

from models.dcgan import GlobalBatchNorm2d


def global_bn_rank(rank: int, world: int, port: int, x, w, weight, bias, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = GlobalBatchNorm2d(x.shape[1])
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * w.chunk(world)[rank]).sum().backward()
    # DDP would average parameter gradients over ranks: sum them here to compare with the whole batch
    dist.all_reduce(bn.weight.grad)
    queue.put((rank, *(t.detach().numpy().copy() for t in (y, part.grad, bn.weight.grad, bn.running_mean,
                                                            bn.running_var))))
    dist.destroy_process_group()
