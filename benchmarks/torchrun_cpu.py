"""One process against `torchrun --nproc_per_node=2` on this machine's CPU: training time, decoding, memory, val accuracy.

    .venv/bin/python benchmarks/torchrun_cpu.py                 # hymenoptera
    .venv/bin/python benchmarks/torchrun_cpu.py --set caltech40 # 1,962 train images: decoding weighs more

Hymenoptera (or caltech40), mobilenet_v2 IMAGENET1K_V1 at 160 px, two-phase (2 head epochs, 1 full). Each row
runs the `thaw train` command in its own process(es); `wall_s` is thaw's own training time, the
end-to-end column adds interpreter and process-group start-up. Decoding is the time to decode every
image once before the first epoch (rank 0's, under torchrun). Peak memory is the largest sum of PSS
(a page shared by several processes counted once overall) over the launch's whole process tree,
sampled from outside; the page cache that holds files is not in it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HYMENOPTERA, SHARED_DATA, offline_torch_home, run_with_peak_rss, scratch  # noqa: E402

from thaw.plan.report import render_table  # noqa: E402

SETS = {"hymenoptera": HYMENOPTERA, "caltech40": SHARED_DATA / "caltech40"}
TRAIN = [
    "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
    "--strategy", "two-phase", "--head-epochs", "2", "--epochs", "1", "--image-size", "160", "--json",
]


def run(prefix: list[str], name: str, data: Path) -> list[str]:
    started = time.perf_counter()
    command = [sys.executable, *prefix, "-m", "thaw", "train", str(data), *TRAIN, "--out", str(scratch(name))]
    result, peak = run_with_peak_rss(command, proportional=True)
    total = time.perf_counter() - started
    decoding = f"{result['decode_s']:.1f} s" if "decode_s" in result else "not reported"
    return [name, f"{result['wall_s']:.1f} s", f"{total:.1f} s", decoding, f"{peak / 2**20:.0f} MB", f"{result['val_accuracy']:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=tuple(SETS), default="hymenoptera")
    data = SETS[parser.parse_args().set]
    offline_torch_home()
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    rows = [run([], "one process", data), run(torchrun, "torchrun, 2 processes", data)]
    print(render_table(rows, ["launch", "training wall_s", "end to end", "decoding", "peak memory (PSS)", "best val acc"]))


if __name__ == "__main__":
    main()
