"""Latency and throughput of `limoe serve` for 1, 8 and 32 concurrent clients, text and image.

Starts the real server (`python -m launch.cli serve`) as a subprocess on a
free 127.0.0.1 port, sends a bounded number of one-item requests from N
concurrent asyncio clients per setting, and reports p50/p95/p99 latency,
requests/s and the mean number of items per model batch (from /health).
For scale, the same items embedded one at a time in-process (no HTTP).

Without --model it exports a randomly initialised preset (default
limoe-nano: width 128, depth 4, 8 experts, 32 px, patch 4) with a tokenizer
trained on synthetic captions; speed does not depend on trained weights.

    python benchmarks/serve_latency.py                       # table + benchmarks/results/serve_latency.json
    python benchmarks/serve_latency.py --model runs/demo/export --requests 400

Client and server share the machine's cores, so numbers are lower bounds
for a server with the machine to itself.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import cpu_model, write_json
from launch.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
WORDS = ("red green blue yellow purple orange grinning smiling face cat dog heart star moon sun tree "
         "flower car house fish bird hand thumbs up arrow circle square emoji animal food").split()


def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def png_images(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_export(preset: str, out_dir: Path) -> Path:
    import torch

    import limoe

    tokenizer = limoe.Tokenizer.train(captions(5000, seed=0), vocab_size=1000, context_length=16)
    torch.manual_seed(0)
    model = limoe.create_model(preset, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    return limoe.save(model, tokenizer, out_dir / "export", metadata={"note": "random weights (benchmark)"})


def start_server(model_dir: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, LIMOE_API_KEY=""))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def request_factory(modality: str, texts: list[str], images: list[bytes]):
    if modality == "text":
        return lambda i: ("/v1/embeddings", {"json": {"input": texts[i % len(texts)]}})
    payloads = [base64.b64encode(b).decode() for b in images]
    return lambda i: ("/v1/images/embeddings", {"json": {"input": [payloads[i % len(payloads)]]}})


async def run_clients(url: str, make_request, concurrency: int, total: int) -> tuple[list[float], float]:
    """`concurrency` clients send `total` requests between them; returns (latencies in s, wall s)."""
    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def client_loop():
            for i in counter:
                path, kwargs = make_request(i)
                start = time.perf_counter()
                response = await client.post(path, **kwargs)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def summarize(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "throughput_rps": len(ms) / wall}


def direct_baseline(model_dir: Path, texts, images, n: int, device: str, threads: int | None) -> list[dict]:
    """The same one-item calls made in-process, on a worker thread like the server's: the model's
    share of the latency (PNG decoding included)."""
    import limoe

    embedder = limoe.Embedder(model_dir, device=device)
    rows: list[dict] = []
    worker = threading.Thread(target=_time_direct_calls, args=(embedder, texts, images, n, rows, threads))
    worker.start()
    worker.join()
    return rows


def _time_direct_calls(embedder, texts, images, n: int, rows: list, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    for modality, call, items in (("text", embedder.embed_texts, texts), ("image", embedder.embed_images, images)):
        for i in range(5):
            call([items[i]])
        latencies, start = [], time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            call([items[i % len(items)]])
            latencies.append(time.perf_counter() - t)
        rows.append({"mode": "in-process", "modality": modality, "concurrency": 1,
                     **summarize(latencies, time.perf_counter() - start)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The table as docs/serving.md shows it."""
    lines = ["| mode | modality | clients | p50 ms | p95 ms | req/s | items/batch | model ms/batch | queue ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = [f"{r['mean_batch']:.1f}", f"{r['model_ms_per_batch']:.1f}", f"{r['queue_wait_ms']:.1f}"] \
            if "mean_batch" in r else ["-", "-", "-"]
        lines.append("| " + " | ".join([r["mode"], r["modality"], str(r["concurrency"]), f"{r['p50_ms']:.1f}",
                                         f"{r['p95_ms']:.1f}", f"{r['throughput_rps']:.1f}", *extra]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="export folder (default: a random-weight --preset export)")
    parser.add_argument("--preset", default="limoe-nano", help="preset exported when --model is not given")
    parser.add_argument("--requests", type=int, default=200, help="requests per (modality, concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modalities", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--image-size", type=int, default=64, help="side of the uploaded PNGs (pixels)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="passed to `limoe serve --threads` (and the in-process baseline)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_latency.json")
    args = parser.parse_args()

    texts, images = captions(256, seed=1), png_images(64, args.image_size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_export(args.preset, Path(tmp))
        load_before = os.getloadavg()
        rows = direct_baseline(model_dir, texts, images, min(args.requests, 100), args.device, args.threads)
        port = free_port()
        server = start_server(model_dir, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            for modality in args.modalities:
                make_request = request_factory(modality, texts, images)
                asyncio.run(run_clients(url, make_request, 4, 20))  # warm-up
                for concurrency in args.concurrency:
                    before = httpx.get(url + "/health").json()["batching"]
                    latencies, wall = asyncio.run(run_clients(url, make_request, concurrency, args.requests))
                    after = httpx.get(url + "/health").json()["batching"]
                    batches = after["batches"] - before["batches"]
                    requests = after["requests"] - before["requests"]
                    rows.append({"mode": "http", "modality": modality, "concurrency": concurrency,
                                 **summarize(latencies, wall), "model_batches": batches,
                                 "mean_batch": (after["items"] - before["items"]) / max(batches, 1),
                                 "model_ms_per_batch": 1000 * (after["model_seconds"] - before["model_seconds"])
                                 / max(batches, 1),
                                 "queue_wait_ms": 1000 * (after["queue_wait_seconds"] - before["queue_wait_seconds"])
                                 / max(requests, 1)})
            model_card = httpx.get(url + "/v1/models").json()["data"][0]
        finally:
            server.terminate()
            server.wait(timeout=60)
        load_after = os.getloadavg()

    print(f"\nlimoe serve latency: {model_card['id']} (embedding {model_card['embedding_dim']}, "
          f"{model_card['details']['num_experts']} experts), one item per request, "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms, device {args.device}")
    header = f"{'mode':<11}{'modality':<9}{'clients':>8}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}" \
             f"{'p99 ms':>9}{'req/s':>9}{'items/batch':>12}{'model ms/batch':>15}{'queue ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        http = "mean_batch" in r
        batch = f"{r['mean_batch']:.1f}" if http else "-"
        model = f"{r['model_ms_per_batch']:.1f}" if http else "-"
        wait = f"{r['queue_wait_ms']:.1f}" if http else "-"
        print(f"{r['mode']:<11}{r['modality']:<9}{r['concurrency']:>8}{r['requests']:>9}{r['p50_ms']:>9.1f}"
              f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['throughput_rps']:>9.1f}{batch:>12}{model:>15}{wait:>9}")

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": cpu_model(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "note": "client and server on the same machine, loopback"},
        "model": {k: model_card[k] for k in ("id", "embedding_dim", "image_size", "context_length")}
                 | {"num_experts": model_card["details"]["num_experts"],
                    "parameters": model_card["details"]["parameters"], "weights": "random" if not args.model
                    else str(args.model)},
        "settings": {"requests": args.requests, "max_batch_size": args.max_batch_size,
                     "max_wait_ms": args.max_wait_ms, "image_size": args.image_size, "device": args.device,
                     "threads": args.threads},
        "results": rows,
    }
    print("\n" + markdown_table(rows))
    print(f"\nwrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
