"""Score saved samples with four other classifiers, so that no result rests on one classifier's quirks.

    python bench/repro/cross_check.py bench/repro/results/*.npz runs/demo/digits.npz

Each classifier is trained on all 1,797 real sklearn digits (the project's own SVC, in
pretrain.quality, keeps a quarter out to measure itself); an .npz is what
`pretrain.quality.evaluate_digits` writes (images in [0, 1], the digit asked for).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def classifiers() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    data = load_digits()
    models = {"3-NN": KNeighborsClassifier(3), "logistic": LogisticRegression(max_iter=3000),
              "MLP 128": MLPClassifier((128,), max_iter=2000, random_state=0),
              "random forest": RandomForestClassifier(300, random_state=0)}
    return {name: m.fit(data.data, data.target) for name, m in models.items()}


def main(argv=None) -> int:
    files = [Path(f) for f in (sys.argv[1:] if argv is None else argv)]
    models = classifiers()
    print("| samples | n | " + " | ".join(models) + " |\n|---|---|" + "---|" * len(models))
    for f in files:
        saved = np.load(f)
        x, wanted = saved["images"].reshape(len(saved["images"]), -1) * 16.0, saved["wanted"]
        print(f"| {f} | {len(x)} | " + " | ".join(f"{(m.predict(x) == wanted).mean():.1%}" for m in models.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
