"""Session-wide test data: a tokenizer and shard sets built from data that ships in packages."""
from pathlib import Path

from data_pipelines.config import DataConfig, DatasetConfig
from data_pipelines.demo_data import STDLIB_MODULES, stdlib_corpus
from data_pipelines.sources import DIGIT_NAMES
from data_pipelines.tokenizer import train_tokenizer
from data_pipelines.write_shards import write_shards
from model.model_config import ModelConfig

def build_test_data(root: Path) -> dict:
    corpus = stdlib_corpus(root / "corpus", STDLIB_MODULES[:15], max_chars=20000)
    captions = [f"a handwritten digit {n}" for n in DIGIT_NAMES]
    lines = [line for f in sorted(corpus.iterdir()) for line in f.read_text().splitlines() if line.strip()]
    tok = root / "tok.model"
    train_tokenizer(lines + captions * 20, tok, vocab_size=1000)
    common = dict(tokenizer=str(tok), encoder="pixels", channels=1, progress=False)
    digits = write_shards("digits", str(root / "digits"), samples_per_shard=200, **common)
    text = write_shards("text", str(root / "text"), samples_per_shard=40, input=[str(corpus)], max_chars=400,
                        **common)
    return {"root": root, "tokenizer": tok, "corpus": corpus, "digits": root / "digits", "text": root / "text",
            "manifests": {"digits": digits, "text": text}}


def model_config(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=1000, latent_channels=1, patch_size=2)
    base.update(kw)
    return ModelConfig(**base)


def data_config(*paths, weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    base = dict(seq_len=256, num_workers=2, num_epochs=1, mix_by="documents")
    base.update(kw)
    return DataConfig(datasets=[DatasetConfig(path=str(p), weight=w) for p, w in zip(paths, weights)], **base)
