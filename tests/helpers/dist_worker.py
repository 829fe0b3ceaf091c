"""Worker for tests/test_distributed.py, launched by torchrun: statistics of a tiny model over a folder.

``dist_worker.py FOLDER OUT [KIND ...]``: KIND ``folder`` (the default) passes the folder; ``loader`` a plain
``DataLoader`` over it and ``batches`` a list of its batches, which every process iterates in full (each result
is written to OUT with ``-KIND`` added to its stem).
"""

import sys
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
from conftest import tiny_model  # noqa: E402

from attnflow.stats import attention_stats  # noqa: E402
from attnflow.data.images import ImageFolderDataset, collate_skip_bad  # noqa: E402
from attnflow.data.transforms import eval_transform  # noqa: E402


def main(folder: str, out: str, kinds: list[str]) -> None:
    dist.init_process_group("gloo")
    for kind in kinds or ["folder"]:
        model = tiny_model(seed=0)
        data = folder
        if kind != "folder":
            loader = DataLoader(ImageFolderDataset(folder, eval_transform(model, 64)), batch_size=2,
                                collate_fn=collate_skip_bad)
            data = loader if kind == "loader" else list(loader)
        result = attention_stats(model, data, img_size=64, batch_size=2, device="cpu", workers=0,
                                 progress=False)
        if dist.get_rank() == 0:
            path = Path(out)
            result.write(path if not kinds else path.with_name(f"{path.stem}-{kind}{path.suffix}"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
