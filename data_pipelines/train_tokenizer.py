"""Train the project's sentencepiece tokenizer.

    python -m data_pipelines.train_tokenizer --input docs/*.rst more.txt --vocab-size 4000 --out tok.model

Inputs: text files (.txt/.md/.rst: one sentence per line) or .jsonl with a `text` field, or
folders of them. Special tokens get the fixed ids of ARCHITECTURE.md ("Tokens").
"""
from __future__ import annotations

import argparse
import sys

from data_pipelines.sources import iter_text_files, text_lines
from data_pipelines.tokenizer import train_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--extra-text", nargs="*", default=[], help="extra sentences (e.g. captions)")
    args = p.parse_args(argv)
    files = iter_text_files(args.input)
    if not files:
        print(f"error: no .txt/.md/.rst/.jsonl files under {' '.join(args.input)}", file=sys.stderr)
        return 2
    lines = list(text_lines(files)) + list(args.extra_text)
    tok = train_tokenizer(lines, args.out, args.vocab_size, args.model_type)
    print(f"wrote {args.out}: {tok.vocab_size} pieces from {len(files)} files ({len(lines)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
