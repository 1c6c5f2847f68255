"""One process against `torchrun --nproc_per_node=2` on this machine's CPU: training time and val accuracy.

    .venv/bin/python benchmarks/torchrun_cpu.py

Hymenoptera, mobilenet_v2 IMAGENET1K_V1 at 160 px, two-phase (2 head epochs, 1 full). Each row
runs the `thaw train` command in its own process(es); `wall_s` is thaw's own training time, the
end-to-end column adds interpreter and process-group start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from _common import HYMENOPTERA, ROOT, offline_torch_home, scratch  # noqa: E402

from thaw.plan.report import render_table  # noqa: E402

TRAIN = [
    "-m", "thaw", "train", str(HYMENOPTERA), "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
    "--strategy", "two-phase", "--head-epochs", "2", "--epochs", "1", "--image-size", "160", "--json",
]


def run(prefix: list[str], name: str) -> list[str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *prefix, *TRAIN, "--out", str(scratch(name))], capture_output=True, text=True, cwd=ROOT, check=True)
    total = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [name, f"{result['wall_s']:.1f} s", f"{total:.1f} s", f"{result['val_accuracy']:.4f}"]


def main() -> None:
    offline_torch_home()
    rows = [run([], "one process"), run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "torchrun, 2 processes")]
    print(render_table(rows, ["launch", "training wall_s", "end to end", "best val acc"]))


if __name__ == "__main__":
    main()
