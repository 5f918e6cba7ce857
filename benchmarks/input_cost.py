"""What one hostile-but-small input costs the embedding service: seconds and peak memory.

Each case runs in a fresh Python process that loads an `Embedder` (a randomly
initialised export, limoe-nano: 32 px, context 16), warms it up on a small
image and a short text, then prepares one input the way a request handler
does (`prepare_images`: header checks, decode, resize, crop; `tokenize`) and
reports the wall time and how far the process's peak RSS (`ru_maxrss`) rose
above what it was after the warm-up. "limits off" repeats a case with the
aspect-ratio limit and the tokenized-characters cap disabled: the cost those
limits prevent.

    python benchmarks/input_cost.py                 # table + benchmarks/results/input_cost.json

Cases a limit refuses cost only their header read. Numbers are for this
machine (and its neighbours' load); the memory column does not depend on load.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import format_table, header, write_json

REPO = Path(__file__).resolve().parents[1]
CASES = {
    # name: (kind, what it is)
    "png_1x300000": ("image", "1 x 300,000 grey PNG"),
    "png_1x16000000": ("image", "1 x 16,000,000 grey PNG"),
    "png_409x40900": ("image", "409 x 40,900 grey PNG (16.7M pixels at the 100:1 aspect limit)"),
    "png_4096x4096_rgba": ("image", "4096 x 4096 RGBA PNG (the pixel limit)"),
    "text_16mib": ("text", "one 16 MiB text (the body limit)"),
    "text_256x64kib": ("text", "256 texts of 64 KiB (the item limit x the body limit)"),
}
WITHOUT_LIMITS = ("png_1x300000", "text_16mib", "text_256x64kib")  # 1 x 16M without the limit needs >12 GB


def make_input(case: str):
    from PIL import Image

    if case.startswith("png_"):
        size = {"png_1x300000": (1, 300_000), "png_1x16000000": (1, 16_000_000), "png_409x40900": (409, 40_900),
                "png_4096x4096_rgba": (4096, 4096)}[case]
        mode = "RGBA" if case.endswith("rgba") else "L"
        buf = io.BytesIO()
        Image.new(mode, size, 0 if mode == "L" else (10, 200, 30, 128)).save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    words = "red heart and a grinning cat "
    if case == "text_16mib":
        return [(words * (16 * 2**20 // len(words) + 1))[: 16 * 2**20]]
    return [(words * (2**16 // len(words) + 1))[: 2**16]] * 256


def measure(case: str, export: str, limits: bool) -> dict:
    """Runs inside the child process."""
    import resource
    import time

    import limoe.embedder
    from limoe import Embedder
    from limoe.embedder import ImageError

    if not limits:
        limoe.embedder.MAX_TOKENIZED_CHARS = 2**62
    embedder = Embedder(export, max_image_aspect_ratio=float("inf") if not limits else 100.0)
    data = make_input(case)
    embedder.prepare_images([_small_png()])
    embedder.tokenize(["a warm-up text"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    outcome = "accepted"
    try:
        if CASES[case][0] == "image":
            embedder.prepare_images([data])
        else:
            tokenized = embedder.tokenize(data)
            outcome = f"accepted ({len(tokenized.truncated)} truncated)"
    except ImageError as e:
        outcome = f"refused: {e.code}"
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    size = len(data) if isinstance(data, bytes) else sum(len(t.encode()) for t in data)
    return {"case": case, "limits": "on" if limits else "off", "input_bytes": size, "outcome": outcome,
            "seconds": round(seconds, 3), "peak_rss_growth_mb": round(peak, 1)}


def _small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="export folder (default: a random limoe-nano export)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "input_cost.json"))
    parser.add_argument("--child", nargs=3, metavar=("CASE", "EXPORT", "LIMITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, export, limits = args.child
        print(json.dumps(measure(case, export, limits == "on")))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        export = args.model
        if export is None:
            from serve_latency import make_export

            export = str(make_export("limoe-nano", Path(tmp)))
        rows = []
        runs = [(case, "on") for case in CASES] + [(case, "off") for case in WITHOUT_LIMITS]
        for case, limits in runs:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", case, export, limits], capture_output=True,
                                 text=True, env=env, cwd=REPO / "benchmarks")
            if out.returncode != 0:
                raise SystemExit(f"{case} (limits {limits}) failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.splitlines()[-1])
            row["what"] = CASES[case][1]
            rows.append(row)
            print(f"{case} limits {limits}: {row['outcome']}, {row['seconds']} s, +{row['peak_rss_growth_mb']} MB",
                  flush=True)
    table = format_table(rows, [("what", "input"), ("input_bytes", "bytes"), ("limits", "limits"),
                                ("outcome", "outcome"), ("seconds", "s"), ("peak_rss_growth_mb", "peak RSS +MB")])
    print(table)
    path = write_json(args.out, {**header(__doc__.split("\n\n")[0]), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
