"""Counting what a data run had to skip, per reason, without stopping the run.

Corrupt data is a fact of life in large image-text sets; one bad JPEG must
never kill a training job. Every stage that drops something calls
`skips.add(reason, detail)`: the count goes up, the first few occurrences of
each reason are logged as warning lines, and the totals are available as
metrics. DataLoader workers each have their own counter; they ship what they
counted since the last batch (`take_delta`) along with each batch and the
main process adds it up (`merge`), so the loader's counter covers all workers.
"""
from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("limoe.data")

# Reasons used by the readers (writers have their own, see writer.py).
MISSING_IMAGE = "missing_image"  # no jpg/png/webp field in the sample
UNDECODABLE_IMAGE = "undecodable_image"  # PIL could not decode the bytes
MISSING_CAPTION = "missing_caption"  # no captions.json / txt field
EMPTY_CAPTION = "empty_caption"  # caption fields present but all blank
BAD_CAPTION_JSON = "bad_caption_json"  # captions.json is not a JSON list of strings
BAD_LABEL = "bad_label"  # cls field is not an integer
TRUNCATED_TAR = "truncated_tar"  # a shard ended early (counted once per shard read)
TRUNCATED_SAMPLE = "truncated_sample"  # the incomplete sample at the point a shard broke off
MISSING_SAMPLES = "missing_samples"  # samples sizes.json lists that a shard read did not hold (per sample)
UNREADABLE_SHARD = "unreadable_shard"  # the shard could not be opened or is not a tar file


class SkipCounter:
    """Counts skipped items per reason; logs the first `log_first` of each reason."""

    def __init__(self, log_first: int = 3):
        self.counts: Counter[str] = Counter()
        self.log_first = log_first
        self._unshipped: Counter[str] = Counter()

    def add(self, reason: str, detail: str = "", count: int = 1) -> None:
        self.counts[reason] += count
        self._unshipped[reason] += count
        seen = self.counts[reason]
        if seen <= self.log_first:
            logger.warning("skipped (%s) %s", reason, detail)
            if seen == self.log_first:
                logger.warning("further '%s' skips are counted but not logged", reason)

    def take_delta(self) -> dict[str, int]:
        """What was counted since the last call: workers send this with each batch."""
        delta, self._unshipped = dict(self._unshipped), Counter()
        return delta

    def merge(self, delta: dict[str, int] | None) -> None:
        """Add counts reported by another counter (a worker), without logging again."""
        for reason, count in (delta or {}).items():
            self.counts[reason] += int(count)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_metrics(self, prefix: str = "data/skipped_") -> dict[str, int]:
        """Flat dict for loggers, e.g. {'data/skipped_undecodable_image': 2, 'data/skipped_total': 2}."""
        metrics = {f"{prefix}{reason}": count for reason, count in sorted(self.counts.items())}
        metrics[f"{prefix}total"] = self.total
        return metrics

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = ", ".join(f"{reason}: {count}" for reason, count in self.counts.most_common())
        return f"skipped {self.total} ({parts})"

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"
