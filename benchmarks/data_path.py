"""Preparing a training batch: Pillow crops with per-image normalisation (thaw before) against tensor crops from the
stored pixels with whole-batch normalisation (thaw now), on the same decoded images, seeds and crop boxes.

For each set: the train images decoded once as a run's pixel store holds them (draft size 2x the resize), then
  pillow   each image made a Pillow image, train_transform's steps on it (crop, flip, to tensor, to float,
           normalise), the batch stacked and laid out channels_last: what thaw did per batch before
  tensor   thaw's ImageDataset and loader over the pixel store: the uint8 pixels cropped as tensors, each
           batch normalised at once (what a training epoch does now)
ms per image for each (several passes, the fastest: the least disturbed), and how far the two paths' crops
(uint8, before normalisation) are apart: largest and mean difference in levels.

    .venv/bin/python benchmarks/data_path.py               # hymenoptera and caltech40
    .venv/bin/python benchmarks/data_path.py --quick       # a few images: does it run?
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HYMENOPTERA, SHARED_DATA, markdown, scratch, shrunk_copy  # noqa: E402

SETS = {"hymenoptera": HYMENOPTERA, "caltech40": SHARED_DATA / "caltech40"}
BATCH = 32
PASSES = 3


def fastest(work, passes: int = PASSES) -> float:
    """Seconds of the fastest of `passes` calls."""
    return min(timeit.repeat(work, setup="gc.enable()", number=1, repeat=passes))  # gc on, as in a training run


def measure(root: Path) -> dict:
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from thaw.data.folders import discover
    from thaw.data.loaders import ImageDataset, configure_threads, default_workers, make_loader, sample_seed
    from thaw.data.pixel_store import PixelStore
    from thaw.data.transforms import normalised_per_batch, train_transform
    from thaw.models.adapter import Preprocessing

    configure_threads(default_workers())  # thaw's own thread split
    preprocessing = Preprocessing()  # mobilenet_v2's: bilinear, 224 px crops of a 256 px resize
    samples = discover(root).train
    store = PixelStore(2 * preprocessing.resize_size, 2**34, scratch("data-path") / "pixels.u8")
    store.fill([path for path, _ in samples], default_workers())
    dataset = ImageDataset(samples, train_transform(preprocessing), store.draft_size, store)
    keys = [(index, sample_seed(1, index)) for index in range(len(samples))]
    # thaw's training transform before: the same steps, on Pillow images, normalised per image
    steps = train_transform(preprocessing).transforms  # ToImage, crop, flip, to float, normalise
    before = v2.Compose([*steps[1:3], v2.ToImage(), *steps[3:]])
    on_pillow, _ = normalised_per_batch(before)

    def pillow_epoch() -> None:
        for start in range(0, len(keys), BATCH):
            images = []
            for index, seed in keys[start : start + BATCH]:
                torch.manual_seed(seed)
                images.append(before(Image.fromarray(store.pixels(samples[index][0]).numpy())))
            torch.stack(images).contiguous(memory_format=torch.channels_last)

    def tensor_epoch() -> None:
        for _ in make_loader(dataset, batch_size=BATCH, shuffle=True, seed=1, workers=0):
            pass

    pillow_s, tensor_s = fastest(pillow_epoch), fastest(tensor_epoch)
    largest, total = 0, 0.0
    for index, seed in keys:
        torch.manual_seed(seed)
        reference = on_pillow(Image.fromarray(store.pixels(samples[index][0]).numpy()))
        cropped = dataset[(index, seed)][0]
        difference = (cropped.int() - reference.int()).abs()
        largest, total = max(largest, int(difference.max())), total + float(difference.float().mean())
    store.release()
    return {"images": len(samples), "pillow_ms": 1000 * pillow_s / len(samples), "tensor_ms": 1000 * tensor_s / len(samples),
            "largest_difference": largest, "mean_difference": total / len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--quick", action="store_true", help="a few images per class: does it run?")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    lines = []
    for name in args.sets:
        root = shrunk_copy(SETS[name], per_class=4, classes=3) if args.quick else SETS[name]
        row = measure(root)
        print(name, row, flush=True)
        lines.append([name, str(row["images"]), f"{row['pillow_ms']:.2f}", f"{row['tensor_ms']:.2f}",
                      f"{row['pillow_ms'] / row['tensor_ms']:.1f}x", str(row["largest_difference"]), f"{row['mean_difference']:.3f}"])
    table = markdown(lines, ["set", "train images", "Pillow crops, per-image normalisation ms/img",
                             "tensor crops, batch normalisation ms/img", "speed-up", "largest difference (levels)",
                             "mean difference (levels)"])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
