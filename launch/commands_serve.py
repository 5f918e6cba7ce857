"""`limoe embed` (embed texts/images from the command line) and `limoe serve` (the HTTP service)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _embed_in_chunks(embed, items: list, batch_size: int, desc: str):
    import numpy as np
    from tqdm import tqdm

    chunks = []
    with tqdm(total=len(items), desc=desc, unit=desc.split()[-1], disable=len(items) <= batch_size,
              file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            chunks.append(embed(items[start:start + batch_size]))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks) if chunks else None


def run_embed(args) -> int:
    import numpy as np

    from limoe import Embedder, ExportError
    from limoe.embedder import ImageError
    from limoe.files import atomic_path, atomic_write

    texts = list(args.text or [])
    if args.text_file:
        texts += [line.rstrip("\n") for line in Path(args.text_file).read_text().splitlines() if line.strip()]
    images = list(args.image or [])
    if not texts and not images:
        print("error: nothing to embed: give --text, --text-file and/or --image", file=sys.stderr)
        return 2
    if args.labels and not images:
        print("error: --labels classifies images: give --image too", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix not in (".json", ".npy"):
        print(f"error: --output must end in .json or .npy, not {output.name!r}", file=sys.stderr)
        return 2
    if output is not None and output.suffix == ".npy" and args.labels:
        print("error: classification results are written as JSON: use an --output ending in .json",
              file=sys.stderr)
        return 2
    try:
        embedder = Embedder(args.model, device=args.device, batch_size=args.batch_size)
        z_text = _embed_in_chunks(embedder.embed_texts, texts, args.batch_size, "embedding texts")
        z_image = _embed_in_chunks(embedder.embed_images, images, args.batch_size, "embedding images")
        probs = embedder.classify(images, args.labels, args.templates) if args.labels else None
    except (ExportError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if output is not None and output.suffix == ".npy":
        rows = np.concatenate([z for z in (z_text, z_image) if z is not None]).astype(np.float32)
        with atomic_path(output) as tmp, open(tmp, "wb") as f:
            np.save(f, rows)
        print(f"wrote {output}: float32 {list(rows.shape)}, rows = {len(texts)} texts then {len(images)} images "
              "(in the order given)", file=sys.stderr)
        return 0
    doc = {"model": embedder.config.name, "embedding_dim": embedder.embed_dim}
    if texts:
        truncated = set(embedder.tokenize(texts).truncated)
        doc["texts"] = [{"text": t, "truncated": i in truncated, "embedding": z.tolist()}
                        for i, (t, z) in enumerate(zip(texts, z_text))]
    if images:
        doc["images"] = [{"image": str(p), "embedding": z.tolist()} for p, z in zip(images, z_image)]
    if probs is not None:
        doc["classification"] = []
        for path, row in zip(images, probs):
            ranking = [{"label": args.labels[j], "probability": float(row[j])}
                       for j in np.argsort(-row, kind="stable")]
            doc["classification"].append({"image": str(path), "label": ranking[0]["label"], "ranking": ranking})
    text = json.dumps(doc, indent=None if args.compact else 2)
    if output is None:
        print(text)
    else:
        atomic_write(output, text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    try:
        from limoe.serve import run_server
    except ImportError as e:
        print(f"error: the HTTP service needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})",
              file=sys.stderr)
        return 2
    from limoe import ExportError
    from limoe.serve.settings import API_KEY_ENV, ServeSettings

    settings = ServeSettings(
        model_name=args.model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_items=args.max_items,
        max_prompts=args.max_prompts,
        max_request_bytes=args.max_request_bytes,
        max_image_pixels=args.max_image_pixels,
        max_image_aspect_ratio=args.max_image_aspect_ratio,
        torch_threads=args.threads,
    )
    try:
        run_server(args.model, host=args.host, port=args.port, device=args.device, settings=settings,
                   log_level=args.log_level)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value >= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def register(subparsers) -> None:
    from limoe.serve.settings import ServeSettings  # no FastAPI import: `limoe --help` works without it

    d = ServeSettings()
    p = subparsers.add_parser(
        "embed", help="embed texts and images (and classify images) with an exported model",
        description="Embed texts and/or images with a `limoe.save` export and print the L2-normalised "
                    "embeddings as JSON, or write them to a .json or .npy file. With --labels, also rank "
                    "the labels for each image (zero-shot classification).",
        epilog="example: limoe embed --model runs/demo/export --text 'a red heart' --image heart.png "
               "--labels heart dog star")
    p.add_argument("--model", required=True, metavar="DIR", help="export folder (model.safetensors, "
                   "config.json, tokenizer.model)")
    p.add_argument("--text", nargs="+", action="extend", metavar="TEXT", help="texts to embed")
    p.add_argument("--text-file", metavar="FILE", help="more texts, one per line")
    p.add_argument("--image", nargs="+", action="extend", metavar="PATH", help="image files to embed")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels: classify each --image")
    p.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                   help="prompt templates with a '{}' for the label, averaged per label (default: the label)")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE.json, or FILE.npy (a float32 array: "
                   "text rows, then image rows); default: print JSON")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="items per forward pass (default: 64)")
    p.set_defaults(func=run_embed)

    s = subparsers.add_parser(
        "serve", help="serve an exported model over HTTP (OpenAI-compatible embeddings, images, classify)",
        description="Serve a `limoe.save` export with FastAPI + uvicorn: POST /v1/embeddings (OpenAI "
                    "embeddings API), POST /v1/images/embeddings, POST /v1/classify, GET /v1/models, "
                    "GET /health; interactive docs at /docs. Concurrent requests are batched together. "
                    "Needs the serve extra: pip install -e '.[serve]'.",
        epilog="example: LIMOE_API_KEY=secret limoe serve --model runs/demo/export --port 8000")
    s.add_argument("--model", required=True, metavar="DIR", help="export folder")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s); anything but loopback exposes the "
                        "model to the network")
    s.add_argument("--port", type=int, default=8000, help="port (0 picks a free one) (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model's forward passes (default: torch's choice; on a machine "
                        "shared with other work, 1-2 avoids oversubscription)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $LIMOE_API_KEY; "
                        "none = open)")
    s.add_argument("--model-name", default=None, help="model id clients send and /v1/models shows "
                   "(default: the config's name)")
    s.add_argument("--max-batch-size", type=_positive_int, default=d.max_batch_size,
                   help="most items coalesced into one forward pass (default: %(default)s)")
    s.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a batch waits for more requests before running (default: %(default)s)")
    s.add_argument("--queue-size", type=_positive_int, default=d.queue_size,
                   help="requests waiting for the model; more get 503 (default: %(default)s)")
    s.add_argument("--max-items", type=_positive_int, default=d.max_items,
                   help="texts, images or labels per request (default: %(default)s)")
    s.add_argument("--max-prompts", type=_positive_int, default=d.max_prompts,
                   help="labels x templates per classify request (default: %(default)s)")
    s.add_argument("--max-request-bytes", type=_positive_int, default=d.max_request_bytes,
                   help="largest request body (default: %(default)s)")
    s.add_argument("--max-image-pixels", type=_positive_int, default=d.max_image_pixels,
                   help="largest image (width x height), checked before decoding (default: %(default)s)")
    s.add_argument("--max-image-aspect-ratio", type=_positive_float, default=d.max_image_aspect_ratio,
                   help="most elongated image (long side / short side), checked before decoding; bounds the "
                        "resize to the model's input (default: %(default)s)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log verbosity (default: %(default)s)")
    s.set_defaults(func=run_serve)
