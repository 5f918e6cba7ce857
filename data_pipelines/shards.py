"""Finding shards, splitting them over ranks and workers, and reading one shard.

A shard spec can be a brace pattern (`dir/emoji-google-{000000..000003}.tar`),
a glob, a directory (all `*.tar` in it, or in its `shards/` subfolder), a
`::`-separated string of those (open_clip's convention) or a list of them.
Missing local shards are an error that names them, before any worker starts.

`read_shard` reads one tar file with webdataset's tar iterator and groups
files into samples by key itself, so that it knows, per shard, whether the
tar broke off early (truncated download, full disk): it then counts the shard
once as `truncated_tar`, keeps every sample read before the break, and marks
the possibly incomplete last one with `__truncated__` so the sample parser
reports it as `truncated_sample` rather than as a caption problem. When the
shard folder has a `sizes.json` (our writer writes one), a shard that ends
cleanly but with fewer samples than listed (a cut inside a tar header, a tar
with no members) is also counted as truncated, and every listed sample that
was not read is counted as `missing_samples`.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import torch.utils.data
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .skips import MISSING_SAMPLES, TRUNCATED_TAR, UNREADABLE_SHARD, SkipCounter

SIZES_FILE = "sizes.json"


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _expand_one(spec: str) -> list[str]:
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        found = sorted(glob.glob(str(path / "*.tar")))
        if not found and (path / "shards").is_dir():
            found = sorted(glob.glob(str(path / "shards" / "*.tar")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {path} (nor in {path / 'shards'})")
        return found
    expanded = list(braceexpand.braceexpand(str(path)))
    result = []
    for item in expanded:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no shards match {item}")
            result.extend(matches)
        else:
            result.append(item)
    return result


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard spec into a list of shard paths/URLs; local ones must exist."""
    if isinstance(spec, (str, os.PathLike)):
        parts = [p for p in str(spec).split("::") if p]
    else:
        parts = [str(p) for p in spec]
    shards = [shard for part in parts for shard in _expand_one(part)]
    if not shards:
        raise FileNotFoundError(f"no shards given ({spec!r})")
    missing = [s for s in shards if not _is_remote(s) and not os.path.isfile(s)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shard(s) not found: {shown}")
    return shards


@lru_cache(maxsize=256)
def _sizes_in_folder(folder: str) -> dict[str, int]:
    path = os.path.join(folder, SIZES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        sizes = json.load(f)
    # open_clip's flat {shard_name: count} layout, plus our "total" entry.
    return {name: int(count) for name, count in sizes.items() if name.endswith(".tar")}


def expected_shard_size(shard: str) -> int | None:
    """Sample count of a local shard according to its folder's sizes.json, if any."""
    if _is_remote(shard):
        return None
    return _sizes_in_folder(os.path.dirname(os.path.abspath(shard))).get(os.path.basename(shard))


def count_samples(shards: Sequence[str]) -> int | None:
    """Total samples listed in sizes.json for these shards; None if any is unknown."""
    sizes = [expected_shard_size(s) for s in shards]
    return None if any(s is None for s in sizes) else sum(sizes)


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_shards(shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Shards for one worker of one rank: every shard goes to exactly one (rank, worker).

    Unlike webdataset's split_by_node this takes rank/world_size as arguments
    rather than reading torch.distributed, so ranks can be simulated in tests.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"bad split: rank {rank}/{world_size}, worker {worker}/{num_workers}")
    return list(shards)[rank::world_size][worker::num_workers]


def _has_fields(sample: dict | None) -> bool:
    return sample is not None and any(not k.startswith("__") for k in sample)


def read_shard(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Yield the samples of one tar shard as {"__key__", "__url__", ext: bytes, ...}.

    Never raises for bad data: an unreadable or truncated shard is counted
    and the samples read so far are still yielded.
    """
    expected = expected_shard_size(url)
    current: dict | None = None
    complete = 0  # samples yielded
    files = 0
    broke_off = False
    try:
        with gopen(url, "rb") as stream:
            for item in tar_file_iterator(stream):  # default handler re-raises: we handle it below
                files += 1
                key, ext = base_plus_ext(item["fname"])
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if _has_fields(current):
                        complete += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = item["data"]
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        if files == 0:
            skips.add(UNREADABLE_SHARD, f"{url}: {error}")
            _count_missing(url, expected, 0, skips)
            return
        skips.add(TRUNCATED_TAR, f"{url}: {error} after {complete} samples")
        broke_off = True
    last = current if _has_fields(current) else None
    read = complete + (last is not None)
    if not broke_off and expected is not None and read < expected:
        # tarfile treats a cut inside a header, or a tar with no members, as a clean end:
        # sizes.json tells us otherwise.
        skips.add(TRUNCATED_TAR, f"{url}: ended after {read} of {expected} samples")
        broke_off = True
    _count_missing(url, expected, read, skips)
    if last is not None:
        if broke_off:
            last["__truncated__"] = True
        yield last


def _count_missing(url: str, expected: int | None, read: int, skips: SkipCounter) -> None:
    """Samples sizes.json lists that the shard did not hold, counted one by one."""
    if expected is not None and read < expected:
        skips.add(MISSING_SAMPLES, f"{url}: {expected - read} of the {expected} samples in {SIZES_FILE} "
                                   "are not in the shard", count=expected - read)
