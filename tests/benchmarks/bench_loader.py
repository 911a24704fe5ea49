"""Images/s of the training loader alone against the training step's, on an image folder of JPEGs.

The loader is the library's own: `data.image_folder` (timm's training transforms at the model's
input size) and `data.loaders.train_loader` with an `EpochSampler`, as `distill.train` builds it
at each epoch, for each number of workers. `tuned` rows add what `train_loader` does not set:
`prefetch_factor` and `persistent_workers` (timed on a second epoch, whose workers are already
up). `--decode draft` decodes JPEGs at a reduced DCT scale no smaller than the model's input
(PIL `Image.draft`) before the transforms: a gain when the files are larger than the input.
Pinned memory as in training: on when CUDA is there (`--no-pin` turns it off).

The step's images/s is `--step-images-per-s`, or measured here with bench_distill_step's PELA
step (`--step-model`, `--step-batch`, `--step-variant`, `--device`). loader / step ≥ 1: the
run is not input-bound. Without `--folder`, `--images` JPEGs of `--image-size` pixels (smooth
random colour fields with noise) are written to a temporary folder first.

    python tests/benchmarks/bench_loader.py --images 20000 --image-size 400 --workers 0 4 8 16 --step-model deit_base_patch16_224 --step-batch 128 --device cuda
    python tests/benchmarks/bench_loader.py --images 200 --workers 0 2 --batch 32 --model deit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lowrank_cli.data.images import ImageFiles, image_folder
from lowrank_cli.data.loaders import EpochSampler, train_loader
from lowrank_cli.models import create_model, get_family


@dataclass
class LoaderTiming:
    first_batch_s: float  # from iter() to the first batch: worker start-up
    images_per_s: float  # after the first batch
    batches: int


def write_jpeg(path: Path, size: int, seed: int) -> int:
    """A smooth random colour field with noise, as a JPEG (quality 90); returns its bytes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.clip(np.asarray(small, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    return path.stat().st_size


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> float:
    """`images` training JPEGs in `classes` class folders (and one validation image per class); returns the mean file size."""
    jobs = [(root / "train" / f"c{i % classes}" / f"{i}.jpg", i) for i in range(images)]
    jobs += [(root / "val" / f"c{c}" / "0.jpg", images + c) for c in range(classes)]
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sizes = list(pool.map(lambda job: write_jpeg(job[0], size, job[1]), jobs))
    return sum(sizes[:images]) / images


class DraftImageFiles(ImageFiles):
    """`ImageFiles` decoding JPEGs at the smallest DCT scale that keeps both sides ≥ `size`."""

    def __init__(self, base: ImageFiles, size: int):
        super().__init__(base.samples, base.transform, base.skip_unreadable)
        self.size = size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            im.draft("RGB", (self.size, self.size))
            image = im.convert("RGB")
        return self.transform(image), label


def time_epoch(loader: DataLoader) -> LoaderTiming:
    """One pass over `loader`: the first batch's latency, then images/s over the rest."""
    t0 = time.perf_counter()
    batches = iter(loader)
    next(batches)
    t1 = time.perf_counter()
    images, n = 0, 1
    for x, _ in batches:
        images += len(x)
        n += 1
    return LoaderTiming(t1 - t0, images / max(time.perf_counter() - t1, 1e-9), n)


def tuned_loader(dataset, sampler: EpochSampler, workers: int, pin: bool, prefetch: int) -> DataLoader:
    """`train_loader` plus prefetching and workers that live across epochs."""
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, num_workers=workers, pin_memory=pin,
                      prefetch_factor=prefetch, persistent_workers=True, generator=torch.Generator().manual_seed(sampler.seed))


def step_images_per_s(args: argparse.Namespace) -> float | None:
    """The training step's images/s: given, or measured with bench_distill_step's PELA step."""
    if args.step_images_per_s is not None:
        return args.step_images_per_s
    if args.step_model is None:
        return None
    import bench_distill_step as bench  # this script's folder is on sys.path when it is run as a script

    from lowrank_cli.device import resolve_device

    device = resolve_device(args.device)
    recipe = bench.recipe_for(args.step_model, "auto", None)
    cfg = recipe.distill.model_copy(update={"amp": args.amp})
    setup = bench.build_setup(args.step_model, recipe)
    opts = bench.Options(fused=True, fast_teacher=True) if args.step_variant == "fast" else bench.Options()
    x = torch.randn(args.step_batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.step_batch,), device=device)
    m = bench.measure(lambda: bench.pela_step(setup, cfg, device, opts), x, y, device, warmup=2, iters=args.step_iters)
    amp = cfg.amp if device.type == "cuda" else "fp32"
    print(f"training step: {args.step_model} PELA ({args.step_variant}), batch {args.step_batch}, {amp} on {device}: "
          f"{m.images_per_s:.0f} images/s", flush=True)
    return m.images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="an image folder in timm's layout (default: JPEGs written to a temporary folder)")
    ap.add_argument("--images", type=int, default=2000, help="training images to write without --folder")
    ap.add_argument("--image-size", type=int, default=224, help="side of the written JPEGs (ImageNet's average is about 400×350)")
    ap.add_argument("--model", default="deit_base_patch16_224", help="whose input size, mean/std and interpolation the transforms use")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[4], help="prefetch_factor of the tuned rows")
    ap.add_argument("--no-tuned", action="store_true", help="only the library's loader")
    ap.add_argument("--decode", nargs="+", default=["pil"], choices=["pil", "draft"])
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--step-images-per-s", type=float, default=None)
    ap.add_argument("--step-model", default=None, help="measure the PELA step of this model (bench_distill_step)")
    ap.add_argument("--step-batch", type=int, default=128)
    ap.add_argument("--step-variant", default="library", choices=["library", "fast"])
    ap.add_argument("--step-iters", type=int, default=5)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    pin = torch.cuda.is_available() and not args.no_pin

    with torch.device("meta"):
        cfg = get_family("timm").data_config(create_model(args.model))
    with tempfile.TemporaryDirectory(prefix="lowrank-loader-") as tmp:
        root = args.folder
        if root is None:
            root = Path(tmp)
            t = time.perf_counter()
            mean_bytes = make_folder(root, args.images, args.image_size)
            print(f"wrote {args.images} JPEGs of {args.image_size}² px (mean {mean_bytes / 1024:.0f} KiB) in {time.perf_counter() - t:.1f} s")
        data = image_folder(root, cfg)
        print(f"{len(data.train)} training images from {root}; transforms at {cfg.input_size[1]}² px; batch {args.batch}; "
              f"{os.cpu_count()} CPU cores; pin_memory {pin}", flush=True)
        step = step_images_per_s(args)
        rows = []
        for decode in args.decode:
            dataset = DraftImageFiles(data.train, cfg.input_size[1]) if decode == "draft" else data.train
            sampler = EpochSampler(len(dataset), args.batch, seed=0)
            for workers in args.workers:
                t = time_epoch(train_loader(dataset, sampler, workers, pin))
                rows.append(("library", workers, "-", decode, t))
                if args.no_tuned or workers == 0:
                    continue
                for prefetch in args.prefetch:
                    loader = tuned_loader(dataset, sampler, workers, pin, prefetch)
                    time_epoch(loader)  # starts the workers
                    rows.append(("tuned", workers, str(prefetch), decode, time_epoch(loader)))
                    del loader
                print(f"  {decode} decoding, {workers} workers done", flush=True)
    print()
    print("| loader | workers | prefetch | decode | batches | first batch s | images/s | loader / step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, workers, prefetch, decode, t in rows:
        ratio = f"{t.images_per_s / step:.2f}" if step else "n/a"
        print(f"| {kind} | {workers} | {prefetch} | {decode} | {t.batches} | {t.first_batch_s:.2f} | {t.images_per_s:.0f} | {ratio} |")
    if step:
        print(f"\nstep: {step:.0f} images/s; loader / step < 1 means the run waits on its input")


if __name__ == "__main__":
    main()
