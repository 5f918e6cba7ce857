"""How whole the emoji class names stay under each tokenizer: the numbers docs/quality.md quotes
when it explains why a larger SentencePiece vocabulary helped name-level zero-shot.

For the class names of a zero-shot folder (default: the Twemoji names, `classnames.txt`) and each
tokenizer file given, it counts the distinct words of the names, how many of them are a single
piece, how many of the words that occur in only one name (the words that tell names apart) are,
and the mean number of pieces per name. Prints a table and writes JSON.

    python benchmarks/tokenizer_coverage.py --data data \\
        --tokenizers data/emoji-google/tokenizer-sp1000.model data/emoji-google/tokenizer-sp8000.model
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import header, write_json  # noqa: E402
import sentencepiece as spm  # noqa: E402

from limoe.tokenizer import Tokenizer  # noqa: E402


def coverage(names: list[str], tokenizer: Tokenizer) -> dict:
    processor = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)

    def pieces(text: str) -> int:  # no end token, no truncation
        return len(processor.encode(text))

    counts = collections.Counter(word for name in names for word in name.split())
    rare = [word for word, n in counts.items() if n == 1]
    return {
        "vocab_size": tokenizer.vocab_size,
        "names": len(names),
        "distinct_words": len(counts),
        "distinct_words_one_piece": sum(pieces(word) == 1 for word in counts),
        "words_in_one_name": len(rare),
        "words_in_one_name_one_piece": sum(pieces(word) == 1 for word in rare),
        "mean_pieces_per_name": statistics.fmean(pieces(name) for name in names),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data",
                        help="the emoji data folder: quality.py's (default: data) or `limoe demo`'s (runs/demo/data)")
    parser.add_argument("--names", default=None,
                        help="classnames.txt to read (default: DATA/emoji-twitter/zeroshot/name/classnames.txt)")
    parser.add_argument("--tokenizers", nargs="+", required=True, metavar="FILE",
                        help="SentencePiece tokenizer files (tokenizer-sp1000.model, ...)")
    parser.add_argument("--out", default="benchmarks/results/tokenizer_coverage.json", help="JSON output")
    args = parser.parse_args(argv)

    names_file = Path(args.names or Path(args.data) / "emoji-twitter" / "zeroshot" / "name" / "classnames.txt")
    if not names_file.is_file():
        parser.error(f"{names_file}: no class names there (--data names the folder holding "
                     "emoji-twitter/; `limoe data emoji --style twitter --out DATA/emoji-twitter` builds it)")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    rows = {}
    for path in args.tokenizers:
        if not Path(path).is_file():
            parser.error(f"{path}: no tokenizer file there")
        rows[path] = coverage(names, Tokenizer.load(path))
    print(f"{len(names)} class names from {names_file}\n")
    print("| tokenizer | pieces | distinct words | one piece | words in one name | one piece | pieces per name |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, r in rows.items():
        print(f"| {Path(path).name} | {r['vocab_size']} | {r['distinct_words']} | {r['distinct_words_one_piece']} | "
              f"{r['words_in_one_name']} | {r['words_in_one_name_one_piece']} | {r['mean_pieces_per_name']:.2f} |")
    doc = {**header("tokenizer coverage of the emoji class names"), "names_file": str(names_file), "tokenizers": rows}
    print(f"\nwrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
