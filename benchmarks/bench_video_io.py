"""Writing videos: Pillow's animated WebP against MP4 (H.264) through PyAV and through imageio
with imageio-ffmpeg, on a synthetic video (moving shapes over a textured background). Prints the
median encoding time over ``--repeats`` (alternated) and the file size. The result picks what
``diffalign sample`` and the report write (docs/diffusers.md). Run:
``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_video_io.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_video(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """``uint8 [F, H, W, 3]``: a smooth textured background with two moving squares."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + 2 * c) * np.cos(5 * yy - c) for c in range(3)], -1) * 60 + 128
    base = base + rng.normal(0, 8, base.shape)
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        img = base.copy()
        for k, colour in enumerate(([230, 40, 40], [40, 60, 220])):
            s = size // 6
            x = int((0.1 + 0.7 * f / max(frames - 1, 1)) * (size - s)) if k == 0 else size // 2
            y = size // 3 if k == 0 else int((0.8 - 0.6 * f / max(frames - 1, 1)) * (size - s))
            img[y:y + s, x:x + s] = colour
        out[f] = img.clip(0, 255)
    return out


def webp_pillow(frames: np.ndarray, fps: float, path: Path) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   quality=80)


def mp4_pyav(frames: np.ndarray, fps: float, path: Path) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def mp4_imageio(frames: np.ndarray, fps: float, path: Path) -> None:
    import imageio.v2 as imageio

    imageio.mimwrite(str(path), list(frames), fps=fps, codec="libx264", quality=None,
                     pixelformat="yuv420p", output_params=["-crf", "23"], macro_block_size=1)


WRITERS = {"webp (Pillow)": (webp_pillow, ".webp"), "mp4 (PyAV)": (mp4_pyav, ".mp4"),
           "mp4 (imageio-ffmpeg)": (mp4_imageio, ".mp4")}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    print(f"{'writer':22} {'video':>12} {'ms':>8} {'kB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size:
            video = synthetic_video(args.frames, size)
            times: dict[str, list[float]] = {k: [] for k in WRITERS}
            sizes = {}
            for r in range(args.repeats + 1):  # the first round warms up (imports, codec init)
                for name, (fn, ext) in WRITERS.items():
                    path = Path(tmp) / f"v{ext}"
                    t0 = time.perf_counter()
                    try:
                        fn(video, 16.0, path)
                    except ImportError as e:
                        sizes[name] = None
                        times[name] = []
                        print(f"{name:22} skipped: {e}")
                        continue
                    if r:
                        times[name].append(time.perf_counter() - t0)
                    sizes[name] = path.stat().st_size
            for name in WRITERS:
                if sizes.get(name) is None or not times[name]:
                    continue
                row = {"writer": name, "frames": args.frames, "size": size,
                       "ms": 1e3 * statistics.median(times[name]), "kB": sizes[name] / 1024}
                rows.append(row)
                print(f"{name:22} {f'{args.frames}x{size}x{size}':>12} {row['ms']:8.1f} {row['kB']:8.1f}")
    return rows


if __name__ == "__main__":
    main()
