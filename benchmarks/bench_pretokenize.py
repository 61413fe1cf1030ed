"""Images/s of ``pretokenize`` on a folder of JPEGs, with 0, 1, 2, ... decoding worker processes.

Pretokenizing ImageNet means decoding 1.28M JPEGs of ~500x375 px, centre-cropping and resizing
them. In the main process that is a few ms per image, while a GPU encodes an S tokenizer's
batch of 64 in ~10 ms: without workers the GPU waits on PIL. The script writes ``--images``
ImageNet-sized JPEGs (crops of the bundled photos), then times the whole ``pretokenize`` call
(decode + encode + shard writing) for each worker count, alternating the counts over ``--rounds``,
and prints the median images/s and the speed-up over 0 workers, beside the images/s of decoding
alone (no model): when pretokenize runs near that figure, decoding is the bottleneck.

    python benchmarks/bench_pretokenize.py                             # tiny model: decode-bound on a CPU
    python benchmarks/bench_pretokenize.py --model softvq-s-64 --device cuda --workers 0 4 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from softvq.cli.common import non_negative_int, positive_int, timing_device_argument


def write_jpegs(folder: Path, count: int) -> None:
    from softvq.data.images import bundled_photos, load_rgb

    photos = [load_rgb(p) for p in bundled_photos()]
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        x = int(torch.randint(0, max(1, w - 300), (1,), generator=gen))
        y = int(torch.randint(0, max(1, h - 225), (1,), generator=gen))
        crop = photo.crop((x, y, min(w, x + 400), min(h, y + 300))).resize((500, 375))
        (folder / f"c{i % 10}").mkdir(exist_ok=True)
        crop.save(folder / f"c{i % 10}" / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="softvq-tiny", help="preset or checkpoint (default softvq-tiny)")
    # Bad values are usage errors before the JPEGs are written, as in ``softvq bench gen``.
    parser.add_argument("--images", type=positive_int, default=256, help="JPEGs to write and pretokenize (default 256)")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1, 2],
                        help="decoding worker counts to time (default 0 1 2)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--device", type=timing_device_argument, default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    if len(set(args.workers)) < len(args.workers):  # one output folder per count and round
        parser.error(f"argument --workers: give each count once, got {' '.join(map(str, args.workers))}")

    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.cli.common import load_tokenizer
    from softvq.cpu_allocator import retain_freed_memory
    from softvq.generation.latent_sources import folder_source
    from softvq.generation.pretokenize import pretokenize

    retain_freed_memory()  # as `softvq pretokenize` does
    device = torch.device(args.device)
    try:
        tokenizer = load_tokenizer(args.model, device, quiet=True, precision=args.precision)
    except (CheckpointError, ValueError) as exc:  # an unknown or broken --model: a usage error too
        parser.error(f"argument --model: {exc}")
    size = tokenizer.config.image_size
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    decode_seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        write_jpegs(images, args.images)
        pretokenize(tokenizer, folder_source(images, size), Path(tmp) / "warm", batch_size=args.batch_size,
                    progress=False)  # one-off costs (allocator, kernels) out of the timed runs
        for r in range(args.rounds):
            for workers in args.workers:
                start = time.perf_counter()
                for _ in folder_source(images, size, workers=workers).samples:
                    pass
                decode_seconds[workers].append(time.perf_counter() - start)
                out = Path(tmp) / f"r{r}-w{workers}"
                start = time.perf_counter()
                pretokenize(tokenizer, folder_source(images, size, workers=workers), out,
                            batch_size=args.batch_size, progress=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[workers].append(time.perf_counter() - start)
    base = statistics.median(seconds[args.workers[0]])
    print(f"pretokenize {args.images} JPEGs (500x375 -> {size} px), {args.model} on {device}, batch {args.batch_size}, "
          f"{args.precision}, median of {args.rounds} alternating rounds, {torch.get_num_threads()} torch threads")
    print(f"| workers | decoding alone, images/s | pretokenize, images/s | pretokenize x {args.workers[0]} workers |")
    print("|---|---|---|---|")
    for workers in args.workers:
        t = statistics.median(seconds[workers])
        print(f"| {workers} | {args.images / statistics.median(decode_seconds[workers]):.1f} | "
              f"{args.images / t:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
