"""Writing and reading WebDataset shards for LIMoE training and evaluation.

Builders (folder, CSV/parquet, emoji, ImageNet layout) turn raw data into tar
shards with `writer.ShardSetWriter`; `loader.build_train_loader` and
`loader.build_eval_loader` read them back. See docs/data.md.
"""
from .loader import DataSource, ShardLoader, build_eval_loader, build_train_loader, iter_captions, train_tokenizer
from .shards import resolve_shards
from .skips import SkipCounter
from .writer import Record, ShardSetWriter, WriteSummary, write_shards

__all__ = [
    "DataSource",
    "Record",
    "ShardLoader",
    "ShardSetWriter",
    "SkipCounter",
    "WriteSummary",
    "build_eval_loader",
    "build_train_loader",
    "iter_captions",
    "resolve_shards",
    "train_tokenizer",
    "write_shards",
]
