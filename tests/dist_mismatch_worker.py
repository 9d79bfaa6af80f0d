"""A job whose ranks call different collectives (rank 0 all-reduces, rank 1 all-gathers), run by
tests/test_scale.py under torchrun with TORCH_DISTRIBUTED_DEBUG=DETAIL: the check must catch it and
the trainers' error handling must turn it into one line."""
import argparse
from pathlib import Path


import torch  # noqa: E402

from trainers.cli import run_cli  # noqa: E402
from trainers.runtime import collective_failures, launched_processes, make_accelerator  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with collective_failures(launched_processes(), 30, None):
        accelerator = make_accelerator("no", False, Path(args.out), dist_timeout=30)
        x = torch.ones(3)
        if accelerator.process_index == 0:
            accelerator.reduce(x, reduction="sum")
        else:
            accelerator.gather(x)
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_cli(main)
