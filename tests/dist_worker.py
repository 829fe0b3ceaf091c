"""Worker for tests/test_distributed.py, launched by torchrun: statistics of a tiny model over a folder."""

import sys

import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_model  # noqa: E402

from attnflow.collect import attention_stats  # noqa: E402


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    model = tiny_model(seed=0)
    result = attention_stats(model, folder, img_size=64, batch_size=2, device="cpu", num_workers=0,
                             progress=False)
    if dist.get_rank() == 0:
        result.write(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
