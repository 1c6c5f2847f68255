"""What length-grouped batches save: a forward pass of all-MiniLM-L6-v2 over 1,000 SMS messages.

    .venv/bin/python benchmarks/text_batching.py

Batches of 64, each padded to its longest message; shuffled batches against thaw's
length-grouped ones, in fp32 and bf16 autocast. Ratios in one run (2-core CPU noise).
"""

from __future__ import annotations

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from _common import SHARED_DATA  # noqa: E402

import torch  # noqa: E402

from thaw.data.text import LengthGroupedBatches, TextDataset, load_text_data  # noqa: E402
from thaw.models.hf_text import build_text_model  # noqa: E402
from thaw.plan.report import render_table  # noqa: E402
from text_accuracy import minilm  # noqa: E402


@torch.no_grad()
def seconds(adapter, dataset: TextDataset, batches: list[list[int]], bf16: bool) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            adapter.model(dataset.collate([dataset[i] for i in batch]).images)
    return time.perf_counter() - started


def main() -> None:
    data = load_text_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", seed=0)
    adapter = build_text_model(minilm(), num_classes=2)
    adapter.model.eval()
    dataset = TextDataset(data.train[:1000], adapter.tokenizer, 128)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [order[i : i + 64] for i in range(0, 1000, 64)]
    grouped = LengthGroupedBatches(dataset.lengths, 64, seed=0).batches()
    rows = []
    for bf16 in (False, True):
        plain, by_length = seconds(adapter, dataset, shuffled, bf16), seconds(adapter, dataset, grouped, bf16)
        rows.append(["bf16" if bf16 else "fp32", f"{plain:.2f} s", f"{by_length:.2f} s", f"{plain / by_length:.2f}x"])
    print(render_table(rows, ["precision", "shuffled batches", "length-grouped", "speed-up"]))


if __name__ == "__main__":
    main()
