"""ACDiT's claim that a diffusion-trained backbone understands images, measured on held-out digits.

    python bench/repro/understanding.py [--blocks 1 4 16] [--captioner runs/demo/run] [--reuse]

Trains `configs/repro-acdit.yaml` (digits by diffusion beside text, no image-to-text document) at
each block size, like bench/repro/acdit_sweep.py but into runs of its own (`--out`; the sweep's
older runs saw all 1,797 digits), then probes each model: the 300 held-out digits
(scikit-learn's last 300, in no training set) are laid out as image-first documents (`<bos> <boi>`
clean copy `<eoi>`, block-causal in ACDiT mode, as training lays clean blocks out), the hidden
states of the image tokens are mean-pooled after each layer, and a logistic regression is scored by
5-fold cross-validation over the 300 (its accuracy at telling the 10 digits apart). The same probe
runs on the untrained model (the first model's config, before any step: its zero-initialised
adaLN gates make every block the identity on image tokens), on the same with every weight
perturbed (a random transformer) and on the raw pixels. With `--captioner RUN`, a model trained with image-to-text documents captions the same 300.
Prints one table and writes bench/repro/results/understanding.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, torchrun  # noqa: E402  (bench/repro/common.py)

FOLDS = 5


def probe_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean accuracy of a standardised logistic regression over stratified folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
    return float(cross_val_score(clf, features, labels, cv=folds).mean())


def layer_features(model, latents) -> list[np.ndarray]:
    """Mean-pooled hidden states of the image tokens of each image-first document, after the input
    projection (layer 0) and after each block: a list of (n, dim) arrays."""
    import torch
    from model.generate import caption_document
    from model.layout import LayoutSpec, pack_rows
    spec = LayoutSpec.from_model_config(model.cfg)
    docs = [caption_document(lat, [], spec) for lat in latents]
    batch = pack_rows([[d] for d in docs], len(docs[0]))
    image = (batch.modality != 0).unsqueeze(-1).float()
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for blk in model.blocks]
    hooks.append(model.latent_in.register_forward_hook(lambda m, i, o: captured.insert(0, o)))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    first = captured[0]  # latent_in: (N, dim), the image tokens in sequence order
    pooled = [first.reshape(len(docs), -1, first.shape[-1]).mean(1).numpy()]
    for h in captured[1:]:
        pooled.append(((h * image).sum(1) / image.sum(1)).numpy())
    return pooled


def open_gates(model, std: float = 0.02):
    """The model with N(0, std) added to every weight, so that its zero-initialised adaLN gates (which
    make an untrained block the identity on latent tokens) are open: a random transformer."""
    import torch
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def main(argv=None) -> int:
    import torch
    from data_pipelines.demo_data import build
    from data_pipelines.encoders import load_encoder
    from model.config_system import load_config
    from model.transformer import UnifiedTransformer
    from pretrain.config import ExperimentConfig
    from pretrain.evaluation.captioning import evaluate_heldout_captions, heldout_digits
    from pretrain.export.release import load_for_sampling
    from data_pipelines.sources import digit_split
    from sklearn.datasets import load_digits
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-acdit.yaml")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default="runs/repro/understanding", help="its own runs (trained on the 1,497 digits)")
    p.add_argument("--reuse", action="store_true", help="keep this script's runs that finished")
    p.add_argument("--captioner", default=None, help="a run trained with image-to-text documents (make demo's)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(ExperimentConfig, REPO / a.config, a.overrides)
    build(REPO / Path(cfg.data.datasets[0].path).parent)
    images, _ = heldout_digits()
    labels = load_digits().target[list(digit_split("heldout"))]
    rows = [dict(model="raw pixels (64 values)", layers=[probe_accuracy(images.reshape(len(images), -1), labels)])]
    torch.manual_seed(0)
    untrained = UnifiedTransformer(load_config(ExperimentConfig, REPO / a.config,
                                               a.overrides + [f"model.block_size={a.blocks[0]}"]).model)
    models = [(f"untrained, as training starts (block size {a.blocks[0]}; adaLN gates 0: blocks pass image tokens "
               "through)", None, untrained),
              ("random weights, adaLN gates open", None, open_gates(copy.deepcopy(untrained)))]
    for block in a.blocks:
        run = REPO / a.out / f"block_size={block}"
        seconds = torchrun(a.ranks, a.config, run, a.overrides + [f"model.block_size={block}"], reuse=a.reuse)
        models.append((f"diffusion only, block size {block}", seconds, load_for_sampling(run).model))
    encoder = None
    for name, seconds, model in models:
        encoder = encoder or load_encoder(load_for_sampling(REPO / a.out / f"block_size={a.blocks[0]}").info["encoder"])
        latents = torch.from_numpy(np.asarray(encoder.encode_images(images), np.float32))
        feats = layer_features(model.eval(), latents)
        rows.append(dict(model=name, train_seconds=seconds, layers=[probe_accuracy(f, labels) for f in feats]))
        print(f"{name}: " + " ".join(f"{x:.1%}" for x in rows[-1]["layers"]), flush=True)
    captions = None
    if a.captioner:
        captions = evaluate_heldout_captions(load_for_sampling(REPO / a.captioner))
        print(f"captioner {a.captioner}: {captions['caption_accuracy']:.1%} of 300 captioned right")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "understanding.json").write_text(json.dumps(
        {"config": a.config, "overrides": a.overrides, "folds": FOLDS, "rows": rows, "captioner": a.captioner,
         "captions": captions}, indent=2) + "\n")
    n = max(len(r["layers"]) for r in rows)
    print("\n| features | " + " | ".join(["input"] + [f"after block {i}" for i in range(1, n)]) + " | best |")
    print("|---" * (n + 2) + "|")
    for r in rows:
        cells = [f"{x:.1%}" for x in r["layers"]] + [""] * (n - len(r["layers"]))
        print(f"| {r['model']} | " + " | ".join(cells) + f" | **{max(r['layers']):.1%}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
