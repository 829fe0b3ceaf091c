"""Worker of tests/test_loop.py, launched by torchrun with 2 gloo processes: every analysis interrupted at its
second batch step on each process (each keeps its own state file), then resumed; rank 0 writes each result.

``loop_worker.py FOLDER OUT``: writes ``OUT/{stats,aggregate,localize}.parquet`` (and ``localize-curve.parquet``).
"""

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from interrupts import fail_at_step  # noqa: E402
from test_loop import ANALYSES  # noqa: E402


def main(folder: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    for name, run in ANALYSES.items():
        state = out / f"{name}.state.pt"
        with pytest.MonkeyPatch.context() as patch:
            fail_at_step(patch, 2)
            try:
                run(folder, batch_size=1, state_path=state, checkpoint_every=1)
                raise AssertionError("the run was not interrupted")
            except KeyboardInterrupt:
                pass
        result = run(folder, batch_size=2, state_path=state, resume=True)
        if dist.get_rank() == 0:
            result.frame.to_parquet(out / f"{name}.parquet")
            if name == "localize":
                result.curve.to_parquet(out / "localize-curve.parquet")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
