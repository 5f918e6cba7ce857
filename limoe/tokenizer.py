"""SentencePiece text tokenizer with open_clip's calling convention.

`tokenizer(["a dog", "a cat"])` returns a LongTensor [B, context_length]:
the piece ids, truncated so the end-of-text id always fits, then `eos_id`,
then `pad_id` (0) up to the context length. Text models pool at the eos
position, so every row has exactly one eos.

The model is trained in-process from an iterable of strings, stored as the
serialized SentencePiece model proto, and saved as a standard `.model` file
(loadable by `sentencepiece` alone) plus a small JSON sidecar
(`<file>.json`) holding the context length, which is not part of the proto.
Pickling goes through the proto bytes, so DataLoader workers get a copy.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

from .files import atomic_write

PAD_ID = 0
UNK_ID = 1
EOS_ID = 2
DEFAULT_CONTEXT_LENGTH = 16


def _unencodable(texts: Sequence) -> Exception:
    """The error naming the first text sentencepiece cannot take: not a str, or not encodable as UTF-8
    (a lone surrogate such as JSON's "\\ud800")."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return ValueError(f"texts[{i}] is not valid Unicode text ({e.reason} at position {e.start})")
    return TypeError("texts must be strings")


class Tokenizer:
    """A trained SentencePiece model plus the fixed context length of the text tower."""

    def __init__(self, model_proto: bytes, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError("context_length must be at least 2 (one piece and the eos token)")
        self.model_proto = bytes(model_proto)
        self.context_length = int(context_length)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError:  # sentencepiece's own message is a source location in its C++ code
            raise ValueError(f"not a SentencePiece model ({len(self.model_proto):,} bytes that do not parse "
                             "as one)") from None
        if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
            raise ValueError(
                f"expected pad_id={PAD_ID} and eos_id={EOS_ID}, the model has "
                f"pad_id={self._sp.pad_id()} eos_id={self._sp.eos_id()}"
            )

    # ---- training -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8000,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        normalization_rule_name: str = "nmt_nfkc_cf",
        max_sentences: int = 2_000_000,
        num_threads: int | None = None,
    ) -> "Tokenizer":
        """Train a tokenizer from an iterable of strings (no files involved).

        `nmt_nfkc_cf` normalises unicode and case-folds, so "Dog" and "dog"
        share pieces. If the corpus is too small for `vocab_size`, training is
        retried with a soft vocabulary limit, so small data sets never crash;
        check `.vocab_size` for the size actually reached. At most
        `max_sentences` texts are used (the first ones).
        """
        sentences = []
        for text in texts:
            text = " ".join(str(text).split())  # newlines would split one caption in two
            if text:
                sentences.append(text)
            if len(sentences) >= max_sentences:
                break
        if not sentences:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            normalization_rule_name=normalization_rule_name,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=EOS_ID,
            num_threads=num_threads or min(4, os.cpu_count() or 1),
            minloglevel=2,  # SentencePiece is chatty on stderr otherwise
        )
        try:
            proto = cls._train_proto(sentences, **options)
        except RuntimeError as error:
            if "Vocabulary size" not in str(error):
                raise
            # Too few distinct pieces for the requested size: take what the data has.
            proto = cls._train_proto(sentences, hard_vocab_limit=False, **options)
        return cls(proto, context_length=context_length)

    @staticmethod
    def _train_proto(sentences: list[str], **options) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
        return model.getvalue()

    # ---- files ----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, context_length: int | None = None) -> "Tokenizer":
        """Load a `.model` file; the context length comes from the argument,
        else from the `<file>.json` sidecar, else the default (16).
        A file that is not a SentencePiece model, or a broken sidecar, raises ValueError naming it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        proto = path.read_bytes()
        if context_length is None:
            sidecar = Path(f"{path}.json")
            if sidecar.exists():
                try:
                    context_length = int(json.loads(sidecar.read_text())["context_length"])
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{sidecar}: not a tokenizer sidecar with an integer 'context_length' "
                                     f"({type(error).__name__}: {error})") from None
            else:
                context_length = DEFAULT_CONTEXT_LENGTH
        try:
            return cls(proto, context_length=context_length)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the SentencePiece model and its sidecar atomically (temp file, then rename)."""
        path = Path(path)
        sidecar = {"format": "sentencepiece", "context_length": self.context_length, "vocab_size": self.vocab_size}
        atomic_write(path, self.model_proto)
        atomic_write(Path(f"{path}.json"), json.dumps(sidecar, indent=2) + "\n")
        return path

    # ---- properties -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    # ---- encoding -------------------------------------------------------------

    def encode_with_truncation(
        self, texts: str | Sequence[str], context_length: int | None = None, sampling: float = 0.0
    ) -> tuple[torch.Tensor, list[int]]:
        """Tokenize and also return, per text, how many pieces were cut off (0 = fits).

        `sampling` > 0 draws a segmentation at random instead of the best one (subword
        regularization, for training only): for a BPE model it is the probability of skipping each
        merge (BPE-dropout), for a unigram model the smoothing exponent of the sampling
        distribution over all segmentations (Kudo 2018; smaller is more random). SentencePiece
        draws from its own generator (`sentencepiece.set_random_generator_seed`)."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        tokens = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        dropped = []
        try:
            if sampling > 0:
                # One text at a time: a batch call draws in fresh worker threads, each starting
                # SentencePiece's generator again from its seed, so every batch would repeat the
                # same draws. Single calls draw in this thread and continue one stream.
                options = {"enable_sampling": True, "alpha": float(sampling), "nbest_size": -1}
                encoded = [self._sp.encode(text, out_type=int, **options) for text in texts]
            else:
                encoded = self._sp.encode(list(texts), out_type=int)
        except TypeError:  # sentencepiece says only "List elements must be str or bytes"
            raise _unencodable(texts) from None
        for row, ids in enumerate(encoded):
            keep = ids[: length - 1]  # leave room for eos
            dropped.append(len(ids) - len(keep))
            tokens[row, : len(keep)] = torch.tensor(keep, dtype=torch.long)
            tokens[row, len(keep)] = EOS_ID
        return tokens, dropped

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 sampling: float = 0.0) -> torch.Tensor:
        return self.encode_with_truncation(texts, context_length, sampling)[0]

    def decode(self, ids) -> str | list[str]:
        """Inverse of `__call__`: one row gives a string, a batch gives a list of strings.
        Everything from the first eos on (eos, padding) is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID])

    # ---- pickling (DataLoader workers) ----------------------------------------

    def __getstate__(self):
        return {"model_proto": self.model_proto, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["context_length"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


class BPETokenizer:
    """open_clip's bundled byte-level BPE (CLIP's 49,408 tokens), with the same calling
    convention as `Tokenizer`: start token, pieces, end token, then padding.

    Every open_clip id is shifted up by one so that 0 is padding only (open_clip pads with
    0, which is also its "!" token; LIMoE treats id 0 as padding). The end token is the
    largest id, so open_clip's argmax pooling still finds it.

    Nothing is trained or downloaded: the vocabulary file ships inside the open_clip
    package. `save` copies it next to a small JSON file (`tokenizer.bpe.json`), so an
    export is self-contained; `load` checks its SHA-256.
    """

    FILENAME = "tokenizer.bpe.json"
    VOCAB_FILENAME = "tokenizer.bpe.txt.gz"

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_path: str | os.PathLike | None = None):
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        if context_length < 3:
            raise ValueError("context_length must be at least 3 (start token, one piece, end token)")
        self.context_length = int(context_length)
        self.vocab_path = Path(vocab_path or default_bpe())
        self._bpe = SimpleTokenizer(bpe_path=str(self.vocab_path), context_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        return len(self._bpe.encoder) + 1

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return self._bpe.eot_token_id + 1

    @property
    def sot_id(self) -> int:
        return self._bpe.sot_token_id + 1

    def encode_with_truncation(self, texts: str | Sequence[str],
                               context_length: int | None = None) -> tuple[torch.Tensor, list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        tokens = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        dropped = []
        for row, text in enumerate(texts):
            ids = [i + 1 for i in self._bpe.encode(text)]
            keep = ids[: length - 2]  # room for the start and end tokens
            dropped.append(len(ids) - len(keep))
            tokens[row, : len(keep) + 2] = torch.tensor([self.sot_id, *keep, self.eos_id], dtype=torch.long)
        return tokens, dropped

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        return self.encode_with_truncation(texts, context_length)[0]

    def decode(self, ids) -> str | list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._bpe.decode([i - 1 for i in ids if i not in (PAD_ID, self.sot_id)]).strip()

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (JSON) and the vocabulary beside it, atomically."""
        import hashlib

        path = Path(path)
        vocab = self.vocab_path.read_bytes()
        atomic_write(path.with_name(self.VOCAB_FILENAME), vocab)
        doc = {"format": "open_clip-bpe", "context_length": self.context_length, "vocab_size": self.vocab_size,
               "vocab_file": self.VOCAB_FILENAME, "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
               "id_offset": 1}
        atomic_write(path, json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, context_length: int | None = None) -> "BPETokenizer":
        import hashlib

        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        doc = json.loads(path.read_text())
        if doc.get("format") != "open_clip-bpe":
            raise ValueError(f"{path}: not an open_clip BPE tokenizer file (format {doc.get('format')!r})")
        vocab = path.with_name(doc["vocab_file"])
        if hashlib.sha256(vocab.read_bytes()).hexdigest() != doc["vocab_sha256"]:
            raise ValueError(f"{vocab}: SHA-256 does not match {path} (damaged or replaced vocabulary)")
        return cls(context_length or doc["context_length"], vocab_path=vocab)

    def __getstate__(self):
        return {"context_length": self.context_length, "vocab_path": str(self.vocab_path)}

    def __setstate__(self, state):
        self.__init__(state["context_length"], state["vocab_path"])

    def __repr__(self) -> str:
        return f"BPETokenizer(open_clip, vocab_size={self.vocab_size}, context_length={self.context_length})"


Tokenizer.FILENAME = "tokenizer.model"
TOKENIZER_FILES = (Tokenizer.FILENAME, BPETokenizer.FILENAME)


def is_bpe_path(path: str | os.PathLike) -> bool:
    return str(path).endswith(".bpe.json")


def load_tokenizer(path: str | os.PathLike, context_length: int | None = None) -> "Tokenizer | BPETokenizer":
    """A SentencePiece `.model`, an open_clip BPE `.bpe.json`, or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(TOKENIZER_FILES)} there")
        path = found[0]
    if is_bpe_path(path):
        return BPETokenizer.load(path, context_length)
    return Tokenizer.load(path, context_length)
