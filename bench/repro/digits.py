"""MonoFormer at small scale: one model learns text-to-digit images and text; is the text kept?

    python bench/repro/digits.py [--config configs/repro-digits.yaml] [--ranks 2] [--per-digit 100] [key=value ...]

1. builds the demo data (sklearn digits, Debian's Python docs, a held-out text split) if missing;
2. trains the unified model (digits + text) on `--ranks` ranks: RUN/unified;
3. samples `--per-digit` images of each digit with guidance and scores them with the project's
   digit classifier (pretrain.quality): per-digit and overall accuracy, a grid with a row per digit;
4. trains a text-only model on the same text shards with the same schedule, for as many text tokens
   as the unified model trained on: RUN/text-only;
5. compares the two models' held-out text loss (data.eval_datasets: the held-out split).

Writes bench/repro/results/digits.json and digits.png (small files, kept in git) and prints a table.
Dotted overrides apply to both runs (e.g. train.max_steps=400 for a quick look).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, last_record, torchrun  # noqa: E402  (bench/repro/common.py)


def heldout_overlap(train_dir: Path, heldout_dir: Path, min_chars: int = 40) -> dict:
    """Is the held-out text held out? Pieces equal to a training piece (sha256 of the token ids), and
    lines of at least `min_chars` characters that also occur in the training pieces."""
    import hashlib
    from data_pipelines.shards import iter_shard_documents, load_manifest
    from data_pipelines.tokenizer import load_tokenizer
    tok = load_tokenizer(load_manifest(train_dir).tokenizer_path)

    def pieces(directory):
        return [[t for s in segments if "tokens" in s for t in s["tokens"]] for _, segments in
                iter_shard_documents(directory)]

    def digest(ids):
        return hashlib.sha256(str(ids).encode()).hexdigest()

    train, held = pieces(train_dir), pieces(heldout_dir)
    seen = {digest(p) for p in train}
    train_lines = {line for p in train for line in tok.decode(p).splitlines() if len(line) >= min_chars}
    lines = [line for p in held for line in tok.decode(p).splitlines() if len(line) >= min_chars]
    return {"heldout_pieces": len(held), "heldout_pieces_in_training": sum(digest(p) in seen for p in held),
            "heldout_long_lines": len(lines), "heldout_long_lines_in_training": sum(line in train_lines for line in lines)}


def main(argv=None) -> int:
    from data_pipelines.demo_data import build
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.quality import evaluate_digits, format_digit_scores
    from pretrain.export.release import load_for_sampling
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-digits.yaml")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--per-digit", type=int, default=100)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    p.add_argument("--out", default="runs/repro/digits", help="run directories")
    p.add_argument("--skip-text-only", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep the runs in --out that finished (train nothing again)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = REPO / a.out
    cfg = load_config(ExperimentConfig, REPO / a.config, a.overrides)
    build(REPO / Path(cfg.data.datasets[0].path).parent)
    result = {"config": a.config, "overrides": a.overrides, "ranks": a.ranks}

    result["unified_train_seconds"] = torchrun(a.ranks, a.config, out / "unified", a.overrides, a.reuse)
    unified = last_record(out / "unified", "eval/lm_loss")
    final = last_record(out / "unified", "text_tokens")
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    scores = evaluate_digits(load_for_sampling(out / "unified", device), a.per_digit, a.steps, a.cfg,
                             out=RESULTS / "digits.png")
    result.update(digits=scores, unified_eval_lm_loss=unified["eval/lm_loss"], unified_step=unified["step"],
                  unified_text_tokens=final["text_tokens"], unified_latent_tokens=final["latent_tokens"])
    print(format_digit_scores(scores))

    if not a.skip_text_only:
        text = [d for d in cfg.data.datasets if Path(d.path).name == "text"]
        if not text:
            raise SystemExit(f"{a.config}: no data set named 'text' in data.datasets to train the text-only model on "
                             "(or pass --skip-text-only)")
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * a.ranks * cfg.data.seq_len
        steps = math.ceil(final["text_tokens"] / per_step)  # rows are nearly all targets: corrected below
        only = [f"data.datasets=[{{path: {text[0].path}}}]", "train.sample_prompts=[]"]
        for attempt in range(2):
            result["text_only_train_seconds"] = torchrun(
                a.ranks, a.config, out / "text-only", a.overrides + only + [f"train.max_steps={steps}",
                                                                            f"train.eval_interval={steps}"],
                a.reuse and not attempt)
            seen = last_record(out / "text-only", "text_tokens")["text_tokens"]
            if seen >= final["text_tokens"] * 0.99 or attempt:
                break
            steps = math.ceil(steps * final["text_tokens"] / seen)
        text_only = last_record(out / "text-only", "eval/lm_loss")
        if cfg.data.eval_datasets:
            result["overlap"] = heldout_overlap(Path(text[0].path), Path(cfg.data.eval_datasets[0].path))
        result.update(text_only_eval_lm_loss=text_only["eval/lm_loss"], text_only_steps=steps, text_only_text_tokens=seen,
                      text_loss_ratio=unified["eval/lm_loss"] / text_only["eval/lm_loss"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "digits.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| model | steps | text tokens | held-out text loss | digit accuracy | train time |\n|---|---|---|---|---|---|")
    print(f"| unified | {result['unified_step']} | {result['unified_text_tokens']:,} | "
          f"{result['unified_eval_lm_loss']:.3f} | {scores['digit_accuracy']:.1%} | {result['unified_train_seconds']:.0f} s |")
    if "text_only_steps" in result:
        print(f"| text only | {result['text_only_steps']} | {result['text_only_text_tokens']:,} | "
              f"{result['text_only_eval_lm_loss']:.3f} | - | {result['text_only_train_seconds']:.0f} s |")
        print(f"\nheld-out text loss, unified / text-only: {result['text_loss_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
