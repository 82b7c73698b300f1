"""Build the demo's data from what ships in packages: a tokenizer, digits, text, and held-out digits and text.

    python -m data_pipelines.demo_data --out runs/demo/data

Text comes from Debian's python3.11-doc reStructuredText sources when installed (the
Makefile installs them), else from the standard library's own documentation (pydoc). The
last 300 of scikit-learn's digits (`sources.digit_split("heldout")`) are in no training set, in
either direction: they are `digits-heldout`, for evaluation.
"""
from __future__ import annotations

import argparse
import importlib
import pydoc
import shutil
import sys
from pathlib import Path

from data_pipelines.shards import load_manifest
from data_pipelines.sources import DIGIT_NAMES, iter_text_files, text_lines
from data_pipelines.tokenizer import train_tokenizer
from data_pipelines.write_shards import write_shards

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_MODULES = ("json", "collections", "functools", "itertools", "pathlib", "argparse", "dataclasses",
                  "logging", "textwrap", "string", "heapq", "bisect", "shutil", "tarfile", "csv", "typing",
                  "subprocess", "threading", "unittest", "email", "http.client", "sqlite3", "random", "math")


def stdlib_corpus(folder: Path, modules=STDLIB_MODULES, max_chars: int = 0) -> Path:
    """Plain-text renderings of standard-library documentation (real prose, no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in modules:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        (folder / f"{name}.txt").write_text(text[:max_chars] if max_chars else text)
    return folder


def text_corpus(out: Path) -> Path:
    """Debian's Python documentation sources if installed, else the standard library's docs."""
    return PY_DOCS if PY_DOCS.is_dir() else stdlib_corpus(out / "stdlib-docs")


def _built(folder: Path, source: str, options: dict) -> bool:
    """Whether `folder` holds shards of this source with these options (else they are written again:
    a demo folder from before the held-out digits holds all 1,797 in `digits`)."""
    if not (folder / "manifest.json").is_file():
        return False
    wanted = {"name": source, **{k: v for k, v in options.items() if k != "samples_per_shard"}}
    try:
        return load_manifest(folder).source == wanted
    except ValueError:  # a manifest that does not load (edited, half written) is rebuilt too
        return False


def build(out: Path, vocab_size: int = 2000, text_docs: int = 3000, max_chars: int = 1500,
          heldout_docs: int = 200) -> dict:
    """Tokenizer, `digits` (the train split), `text`, `digits-heldout` (the last 300 digits) and
    `text-heldout` (the next pieces of the same corpus) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = text_corpus(out)
    tok = out / "tokenizer.model"
    if not tok.is_file():
        captions = [f"a handwritten digit {n}" for n in DIGIT_NAMES] * 50
        train_tokenizer(list(text_lines(iter_text_files([corpus])))[:100000] + captions, tok, vocab_size)
    done = {}
    text = dict(input=[str(corpus)], max_chars=max_chars)
    heldout = dict(samples_per_shard=150)  # 2 shards, so that 2 ranks share the evaluation
    for name, source, options in (("digits", "digits", dict(split="train")),
                                  ("digits-heldout", "digits", dict(heldout, split="heldout")),
                                  ("text", "text", dict(text, num_samples=text_docs)),
                                  ("text-heldout", "text", dict(text, num_samples=heldout_docs, skip=text_docs,
                                                                samples_per_shard=-(-heldout_docs // 2)))):
        if not _built(out / name, source, options):  # held-out: 2 shards, so that 2 ranks share the evaluation
            shutil.rmtree(out / name, ignore_errors=True)  # no shard of an earlier build stays beside the new
            write_shards(source, str(out / name), str(tok), encoder="pixels", channels=1,
                         **{"samples_per_shard": 256, **options})
        done[name] = load_manifest(out / name)
    return {"tokenizer": tok, "corpus": corpus, **done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo/data")
    p.add_argument("--vocab-size", type=int, default=2000)
    a = p.parse_args(argv)
    info = build(Path(a.out), a.vocab_size)
    print(f"tokenizer: {info['tokenizer']} (text from {info['corpus']})")
    for name in ("digits", "digits-heldout", "text", "text-heldout"):
        m = info[name]
        print(f"{name:14s} {m.num_samples:5d} samples in {len(m.shards)} shards, fingerprint {m.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
