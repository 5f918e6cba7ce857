"""Training loader throughput: samples/s, and per worker, at 64 px and 224 px.

Runs `data_pipelines.build_train_loader` (resampled shards, shuffle buffer,
PIL decode, RGB, random resized crop, caption choice, SentencePiece
tokenization, batching) over real tar shards and counts samples per second
after the first batch (worker start-up and shuffle-buffer fill excluded).

Data: `--data SHARDS` (e.g. the emoji shards: 64 px PNGs), or by default a
synthetic set of 256x256 JPEGs (smooth gradients with a shape, realistic to
decode) written to a temporary folder.

    python benchmarks/loader_throughput.py                                  # synthetic JPEGs
    python benchmarks/loader_throughput.py --data data/emoji-google/shards  # emoji PNGs
    python benchmarks/loader_throughput.py --workers 0 2 4 --seconds 10
    python benchmarks/loader_throughput.py --data data/emoji-google/shards --sizes 32 --workers 1 \
        --augment true '{"scale_min": 0.5, "color_jitter": 0.2}'    # what the demo's augmentation costs

Results: a table on stdout and JSON (command, machine, date) in --out.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, write_json  # noqa: E402
from data_pipelines import build_train_loader, train_tokenizer  # noqa: E402
from data_pipelines.writer import Record, write_shards  # noqa: E402
from launch.train_config import augment_config  # noqa: E402


def synthetic_jpeg(index: int, size: int = 256) -> bytes:
    x = torch.linspace(0, 1, size)
    r, g = x[None, :].expand(size, size), x[:, None].expand(size, size)
    b = torch.full((size, size), (index * 37 % 256) / 255)
    array = (torch.stack([r, g, b], -1) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    offset = index * 13 % (size // 2)
    draw.ellipse((offset, offset, offset + size // 3, offset + size // 3), fill=(index % 256, 90, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_synthetic_shards(folder: Path, num_images: int) -> Path:
    records = (Record(f"img{i:06d}", synthetic_jpeg(i), [f"a picture number {i}", f"synthetic image {i}"])
               for i in range(num_images))
    write_shards(records, folder / "shards", "synthetic", maxcount=max(1, num_images // 8))
    return folder / "shards"


def parse_augment(text: str) -> bool | dict:
    """An --augment value: JSON, as the config's data.augment (false, true or a dict)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--augment takes JSON (false, true or an object), got {text!r}: {e}")
    try:
        augment_config(value)  # rejects unknown keys and wrong types as the config does
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e))
    return value


def measure(shards, tokenizer, image_size: int, workers: int, batch_size: int, seconds: float,
            augment: bool | dict = True) -> dict:
    loader = build_train_loader(shards, tokenizer, image_size, batch_size=batch_size, batches_per_epoch=1_000_000,
                                num_workers=workers, seed=0, augment=augment_config(augment))
    batches = iter(loader)
    start_up = time.perf_counter()
    next(batches)  # worker start-up and shuffle-buffer fill are not throughput
    start = time.perf_counter()
    samples = 0
    while time.perf_counter() - start < seconds:
        images, _ = next(batches)
        samples += images.shape[0]
    elapsed = time.perf_counter() - start
    del batches  # stops the workers
    rate = samples / elapsed
    return {
        "augment": augment,
        "image_size": image_size,
        "workers": workers,
        "batch_size": batch_size,
        "samples": samples,
        "seconds": round(elapsed, 2),
        "first_batch_s": round(start - start_up, 2),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(1, workers), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="shard spec; default: synthetic 256 px JPEGs")
    parser.add_argument("--images", type=int, default=512, help="synthetic images to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="output image sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", type=parse_augment, nargs="+", default=[True],
                        help="training augmentations to compare, each as the config's data.augment in JSON: "
                             "false (resize only), true (crops of 70-100 %% of the area) or an object such as "
                             "'{\"scale_min\": 0.5, \"color_jitter\": 0.2}' (the CPU demo's); default: true")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per setting")
    parser.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            shards, data = args.data, f"shards {args.data}"
        else:
            shards = write_synthetic_shards(Path(tmp), args.images)
            data = f"synthetic: {args.images} JPEGs 256x256"
        tokenizer = train_tokenizer(shards, vocab_size=1000, context_length=16)
        rows = [measure(shards, tokenizer, size, workers, args.batch_size, args.seconds, augment)
                for augment in args.augment for size in args.sizes for workers in args.workers]

    print(f"data: {data}; batch {args.batch_size}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| augment | image px | workers | samples/s | samples/s per worker | first batch (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {json.dumps(row['augment'])} | {row['image_size']} | {row['workers']} | {row['samples_per_s']} | "
              f"{row['samples_per_s_per_worker']} | {row['first_batch_s']} |")
    result = {
        "benchmark": "training loader throughput (data_pipelines.build_train_loader)",
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": data,
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
