"""Training and evaluation loaders over WebDataset shards.

Training (`build_train_loader`), per rank and per DataLoader worker:

    shards --ResampledShards(seed, source, rank, worker, epoch)--> tar samples
      --shuffle buffer--> [mix sources by weight] --decode, RGB, augment--> fixed-size
      batches, one caption per sample at random (one no other sample of the batch
      has, when it can) --tokenize--> (images, tokens)
      [, caption keys, with caption_positives: see `caption_keys`]

Each rank yields exactly `batches_per_epoch` batches per pass, shared out
over its workers; everything random (shard draws, shuffle, caption choice,
augmentation) is seeded from (seed, rank, worker, epoch), so the same seed
and epoch give the same batches and a resumed run picks up the same data.
With `resampled=False` each pass is one plain epoch instead: the shards are
permuted (same permutation on every rank), split by rank then worker, and
read once.

Evaluation (`build_eval_loader`): no resampling, no shuffle, no augmentation;
shards are split by rank then worker, so every sample is seen exactly once
across all ranks and workers; the last batch may be short.

Rank and world size are arguments (never read from torch.distributed), so
tests simulate several ranks in one process. Bad samples and broken shards
are skipped and counted per reason in `loader.skips` (see skips.py), which
adds up what every worker reported.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import sentencepiece as spm
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from limoe.tokenizer import BPETokenizer, Tokenizer, is_bpe_path
from limoe.transforms import AugmentConfig, image_transform

from .samples import parse_sample
from .shards import count_samples, read_shard, resolve_shards, split_shards, worker_info
from .skips import SkipCounter, logger

DEFAULT_SHUFFLE_BUFFER = 1000


@dataclass
class DataSource:
    """One training source: a shard spec and its share of the mix (also an entry of a training
    config's `data.train`)."""

    shards: list[str] | str  # brace pattern, glob, folder, or "::"-joined list of those; or a list of shard paths
    weight: float = 1.0  # sampling weight relative to the other sources


def stable_seed(*parts) -> int:
    """A seed from any parts, identical across processes (unlike hash() of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF


# ---- pipeline stages (generator functions: iterator in, iterator out) --------


def read_shards(urls: Iterable[dict], skips: SkipCounter, give_up_after: int | None = None) -> Iterator[dict]:
    """Raw samples from a stream of {"url": ...}; with resampling, stop if nothing is readable."""
    empty_in_a_row = 0
    for item in urls:
        produced = False
        for sample in read_shard(item["url"], skips):
            produced = True
            yield sample
        empty_in_a_row = 0 if produced else empty_in_a_row + 1
        if give_up_after is not None and empty_in_a_row >= give_up_after:
            raise RuntimeError(f"no readable samples in {empty_in_a_row} shard reads in a row ({skips.summary()})")


def mix_by_weight(streams: list[Iterator], weights: list[float], rng: random.Random) -> Iterator:
    """Interleave streams, drawing each next item from a source chosen by weight.
    Stops when any source runs out (only happens without resampling)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    indices = list(range(len(streams)))
    while True:
        chosen = rng.choices(indices, weights=weights)[0]
        try:
            yield next(streams[chosen])
        except StopIteration:
            return


def train_samples(raws: Iterable[dict], skips: SkipCounter, transform: Callable, rng: random.Random):
    """(image tensor, all its captions) per usable sample; train_batches picks the caption."""
    for raw in raws:
        sample = parse_sample(raw, skips)
        if sample is None:
            continue
        image = _seeded_transform(transform, sample.image, rng.getrandbits(63), skips, sample.key)
        if image is not None:
            yield image, sample.captions


def eval_samples(raws: Iterable[dict], skips: SkipCounter, transform: Callable, require_captions: bool = False):
    for raw in raws:
        sample = parse_sample(raw, skips, need_captions=require_captions)
        if sample is None:
            continue
        image = _seeded_transform(transform, sample.image, 0, skips, sample.key)
        if image is not None:
            label = -1 if sample.label is None else sample.label
            yield {"image": image, "captions": sample.captions, "label": label, "key": sample.key}


def _seeded_transform(transform, image, seed: int, skips: SkipCounter, key: str):
    # torchvision draws from torch's global RNG; fork it so augmentation is
    # reproducible without disturbing the caller's RNG when num_workers=0.
    # One image is too small to share between threads: with num_workers=0 on
    # a busy CPU, the training process's thread pool made this 10-20x slower
    # (DataLoader workers already run single-threaded).
    threads = torch.get_num_threads()
    try:
        if threads != 1:
            torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(image)
    except Exception as error:  # a decodable but unusable image (e.g. zero-sized)
        skips.add("undecodable_image", f"{key}: {type(error).__name__}: {error}")
        return None
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def pick_caption(captions: Sequence[str], taken: set[str], rng: random.Random, unique: bool = True) -> str:
    """One of a sample's captions at random, preferring one no other sample in the batch has
    (unless `unique` is False: then any of them, uniformly).

    Two identical captions in one contrastive batch are false negatives: each image
    is pushed away from a text that describes it. Shared captions are common when
    captions name a class ("an emoji from animals and nature"), so a sample with
    another caption to offer uses that one instead.
    """
    fresh = [c for c in captions if c not in taken] if unique else []
    return rng.choice(fresh or captions)


CAPTION_KEYS_WIDTH = 16  # the drawn caption, then up to 15 more of the sample's captions


def caption_key(caption: str) -> int:
    """A stable nonzero int64 for a caption's text (equal texts, equal keys)."""
    key = int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return key or 1


def caption_keys(drawn: Sequence[str], options: Sequence[Sequence[str]],
                 width: int = CAPTION_KEYS_WIDTH) -> torch.Tensor:
    """[B, width] int64 for the multi-positive loss (`limoe.losses.CaptionPositivesLoss`):
    each row holds the keys of the sample's captions, the drawn one in column 0 (so a sample
    is always a positive of its own caption), 0-padded. A fixed width lets ranks all-gather the
    keys; a sample with more than `width` captions keeps the drawn one and the first others (a
    pair missed that way counts as a negative, as without the option)."""
    keys = torch.zeros(len(drawn), width, dtype=torch.long)
    for row, (caption, captions) in enumerate(zip(drawn, options)):
        mine = [caption_key(c) for c in [caption] + [c for c in dict.fromkeys(captions) if c != caption]][:width]
        keys[row, :len(mine)] = torch.tensor(mine)
    return keys


def train_batches(samples: Iterable, batch_size: int, tokenizer, rng: random.Random,
                  unique_captions: bool = True, subword_sampling: float = 0.0,
                  caption_positives: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Full batches only: a short last batch would change the contrastive loss's scale.
    `subword_sampling` > 0 tokenizes each caption with a randomly drawn segmentation
    (`Tokenizer.encode_with_truncation`'s `sampling`; SentencePiece tokenizers only).
    `caption_positives`: each batch also carries `caption_keys` (which images share captions)."""
    encode = tokenizer if subword_sampling <= 0 else partial(tokenizer, sampling=subword_sampling)
    images, captions, options, taken = [], [], [], set()
    for image, choices in samples:
        images.append(image)
        options.append(choices)
        captions.append(pick_caption(choices, taken, rng, unique_captions))
        taken.add(captions[-1])
        if len(images) == batch_size:
            batch = (torch.stack(images), encode(captions))
            yield batch + (caption_keys(captions, options),) if caption_positives else batch
            images, captions, options, taken = [], [], [], set()


def eval_batches(samples: Iterable[dict], batch_size: int, tokenizer=None) -> Iterator[dict]:
    def collate(items):
        batch = {
            "images": torch.stack([s["image"] for s in items]),
            "captions": [s["captions"] for s in items],
            "labels": torch.tensor([s["label"] for s in items], dtype=torch.long),
            "keys": [s["key"] for s in items],
        }
        if tokenizer is not None:
            batch["tokens"] = tokenizer([s["captions"][0] if s["captions"] else "" for s in items])
        return batch

    items = []
    for sample in samples:
        items.append(sample)
        if len(items) == batch_size:
            yield collate(items)
            items = []
    if items:
        yield collate(items)


def with_skip_reports(batches: Iterable, skips: SkipCounter, limit: int | None = None) -> Iterator[dict]:
    """Wrap each batch with the skips counted since the previous one, so the
    main process can add up what its workers dropped; a last report carries
    anything counted after the last batch."""
    batches = iter(batches)
    produced = 0
    while limit is None or produced < limit:
        batch = next(batches, None)
        if batch is None:
            break
        produced += 1
        yield {"batch": batch, "skips": skips.take_delta()}
    delta = skips.take_delta()
    if delta:
        yield {"batch": None, "skips": delta}


# ---- the datasets run inside each worker ------------------------------------


class TrainStream(IterableDataset):
    """The training pipeline of one rank; each DataLoader worker runs its own copy."""

    def __init__(self, sources, tokenizer, transform, batch_size, batches_per_epoch, rank, world_size,
                 seed, epoch, resampled, shuffle_buffer, unique_captions=True, subword_sampling=0.0,
                 caption_positives=False):
        super().__init__()
        self.caption_positives = caption_positives
        self.unique_captions = unique_captions
        self.subword_sampling = subword_sampling
        self.sources = sources  # list of (shard list, weight)
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        # A plain function returning a generator: the epoch is read now, when
        # the DataLoader starts this pass, not lazily at the first batch.
        return self._generate(self.epoch, *worker_info())

    def _source_samples(self, index, shards, epoch, worker, num_workers, skips):
        def seed(purpose):
            return stable_seed(self.seed, purpose, index, self.rank, worker, epoch)

        if self.resampled:
            shard_stream = wds.ResampledShards(shards, worker_seed=lambda: seed("shards"), deterministic=True)
            give_up_after = max(20, 3 * len(shards))
        else:
            order = list(shards)
            random.Random(stable_seed(self.seed, "epoch-order", index, epoch)).shuffle(order)  # same on all ranks
            mine = split_shards(order, self.rank, self.world_size, worker, num_workers)
            shard_stream = lambda: ({"url": url} for url in mine)  # noqa: E731 (wds.SimpleShardList refuses [])
            give_up_after = None
        bufsize = self.shuffle_buffer
        return iter(wds.DataPipeline(
            shard_stream,
            lambda urls: read_shards(urls, skips, give_up_after),
            wds.shuffle(bufsize, initial=min(bufsize, 500), rng=random.Random(seed("shuffle"))) if bufsize > 1 else None,
        ))

    def _generate(self, epoch, worker, num_workers):
        skips = SkipCounter()
        streams = [self._source_samples(i, shards, epoch, worker, num_workers, skips)
                   for i, (shards, _) in enumerate(self.sources)]
        rng = random.Random(stable_seed(self.seed, "samples", self.rank, worker, epoch))
        if self.subword_sampling > 0:
            # SentencePiece's own generator: seeded here, the segmentations repeat with the sample
            # order when the pipeline runs in the training process (data.workers 0). In a forked
            # DataLoader worker sentencepiece 0.2.3 did not repeat its draws for a seed.
            spm.set_random_generator_seed(stable_seed(self.seed, "subwords", self.rank, worker, epoch) % 2**31)
        limit = None
        if self.batches_per_epoch is not None:  # share this rank's batches out over its workers
            limit = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        pipeline = wds.DataPipeline(
            lambda: mix_by_weight(streams, [w for _, w in self.sources], rng),
            lambda raws: train_samples(raws, skips, self.transform, rng),
            lambda samples: train_batches(samples, self.batch_size, self.tokenizer, rng, self.unique_captions,
                                          self.subword_sampling, self.caption_positives),
            lambda batches: with_skip_reports(batches, skips, limit),
        )
        yield from pipeline


class EvalStream(IterableDataset):
    def __init__(self, shards, tokenizer, transform, batch_size, rank, world_size, require_captions):
        super().__init__()
        self.require_captions = require_captions
        self.shards = shards
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0  # unused: evaluation order never changes

    def __iter__(self):
        worker, num_workers = worker_info()
        shards = split_shards(self.shards, self.rank, self.world_size, worker, num_workers)
        skips = SkipCounter()
        return iter(wds.DataPipeline(
            lambda: ({"url": url} for url in shards),  # a worker may have no shards: it then yields nothing
            lambda urls: read_shards(urls, skips),
            lambda raws: eval_samples(raws, skips, self.transform, self.require_captions),
            lambda samples: eval_batches(samples, self.batch_size, self.tokenizer),
            lambda batches: with_skip_reports(batches, skips),
        ))


# ---- what callers get --------------------------------------------------------


class ShardLoader:
    """Iterable over batches of one rank, backed by a torch DataLoader.

    `skips` counts what was skipped, over all workers and passes.
    Training: each pass uses `epoch` and then advances it; call
    `set_epoch(e)` before a pass to choose it (e.g. when resuming).
    """

    def __init__(self, dataset, num_workers: int, num_batches: int | None, num_samples: int | None,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.num_batches = num_batches  # per pass, for this rank; None if unknown
        self.num_samples = num_samples  # per pass, for this rank; None if unknown
        self.pin_memory = pin_memory
        self.skips = SkipCounter(log_first=0)  # workers log their own first skips

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this loader's length is unknown (no sizes.json)")
        return self.num_batches

    def __iter__(self):
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # the pipeline batches itself
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        items = iter(loader)  # workers start now, with the current epoch
        self.dataset.epoch += 1
        return self._unwrap(items)

    def _unwrap(self, items):
        before = self.skips.total
        for item in items:
            self.skips.merge(item["skips"])
            if item["batch"] is not None:
                yield item["batch"]
        if self.skips.total > before:
            logger.warning("data pass %s", self.skips.summary())


def _as_sources(sources) -> list[DataSource]:
    """A shard spec (str, path, or list of shard paths) is one source; DataSources are one each."""
    if isinstance(sources, DataSource):
        return [sources]
    if isinstance(sources, (str, bytes)) or hasattr(sources, "__fspath__"):
        return [DataSource(shards=str(sources))]
    sources = list(sources)
    if not any(isinstance(s, DataSource) for s in sources):
        return [DataSource(shards=[str(s) for s in sources])]
    return [s if isinstance(s, DataSource) else DataSource(shards=str(s)) for s in sources]


def build_train_loader(
    sources: str | DataSource | Sequence[str | DataSource],
    tokenizer,
    image_size: int,
    batch_size: int,
    batches_per_epoch: int | None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    augment: AugmentConfig | None = None,
    resampled: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    pin_memory: bool = False,
    unique_captions: bool = True,
    subword_sampling: float = 0.0,
    caption_positives: bool = False,
) -> ShardLoader:
    """Training batches `(images [B,3,H,W] float, tokens [B,L] long)` for one rank, plus
    `caption_keys [B, 16] long` (see `caption_keys`) when `caption_positives` is set.

    `sources`: a shard spec (folder, pattern, or list of shard paths) for one
    source, or DataSource objects (a list of them is mixed by weight).
    `batches_per_epoch`: batches this rank yields per pass (required with
    resampling; with `resampled=False`, None means one full pass over the data).
    """
    if resampled and batches_per_epoch is None:
        raise ValueError("batches_per_epoch is required with resampled=True (the stream is endless)")
    resolved = []
    for source in _as_sources(sources):
        if source.weight <= 0:
            raise ValueError(f"source weight must be positive: {source}")
        resolved.append((resolve_shards(source.shards), float(source.weight)))
    transform = image_transform(image_size, train=True, augment=augment or AugmentConfig())
    dataset = TrainStream(resolved, tokenizer, transform, batch_size, batches_per_epoch, rank, world_size,
                          seed, epoch, resampled, shuffle_buffer, unique_captions, subword_sampling,
                          caption_positives)
    num_samples = None if batches_per_epoch is None else batches_per_epoch * batch_size
    return ShardLoader(dataset, num_workers, batches_per_epoch, num_samples, pin_memory)


def build_eval_loader(
    shards: str | Sequence[str],
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    tokenizer=None,
    require_captions: bool = False,
    pin_memory: bool = False,
) -> ShardLoader:
    """Evaluation batches for one rank: dicts with
    `images` [B,3,H,W], `captions` (list of caption lists; empty if none),
    `labels` LongTensor [B] (-1 where a sample has no `cls`), `keys` (list of str),
    and `tokens` [B,L] of each sample's first caption if a tokenizer is given.
    Every sample appears exactly once across all ranks and workers; ranks
    may get different numbers of samples. Samples without usable captions
    are kept (classification needs only the label) unless `require_captions`
    (retrieval), in which case they are skipped and counted.
    """
    shard_list = resolve_shards(shards)
    transform = image_transform(image_size, train=False)
    dataset = EvalStream(shard_list, tokenizer, transform, batch_size, rank, world_size, require_captions)
    num_samples = count_samples(split_shards(shard_list, rank, world_size, 0, 1))
    num_batches = None
    if num_samples is not None and num_workers <= 1:
        num_batches = -(-num_samples // batch_size)  # with several workers each has its own short last batch
    return ShardLoader(dataset, num_workers, num_batches, num_samples, pin_memory)


def iter_captions(shards: str | Sequence[str], skips: SkipCounter | None = None) -> Iterator[str]:
    """Every caption in the shards, in order, without decoding images (for tokenizer training)."""
    skips = skips if skips is not None else SkipCounter()
    for url in resolve_shards(shards):
        for raw in read_shard(url, skips):
            sample = parse_sample(raw, skips, decode=False)
            if sample is not None:
                yield from sample.captions


def train_tokenizer(shards: str | Sequence[str], vocab_size: int, context_length: int,
                    skips: SkipCounter | None = None, **options) -> Tokenizer:
    """A SentencePiece tokenizer trained on every caption in the shards (`limoe tokenizer train`, and
    `limoe train` / `limoe demo` when theirs is missing); `skips` counts what could not be read,
    `options` are Tokenizer.train's (model_type, ...)."""
    return Tokenizer.train(iter_captions(shards, skips), vocab_size=vocab_size, context_length=context_length,
                           **options)


def build_tokenizer(path, shards: str | Sequence[str], vocab_size: int, context_length: int,
                    skips: SkipCounter | None = None, **options) -> Tokenizer | BPETokenizer:
    """Write the tokenizer file `path` names and return it: open_clip's bundled BPE for a
    `*.bpe.json` (nothing to train, `vocab_size` unused), else a SentencePiece model of up to
    `vocab_size` pieces trained on the shards' captions (ValueError if they hold none; `options`
    are Tokenizer.train's, e.g. model_type)."""
    if is_bpe_path(path):
        tokenizer = BPETokenizer(context_length)
    else:
        tokenizer = train_tokenizer(shards, vocab_size, context_length, skips, **options)
    tokenizer.save(path)
    return tokenizer
