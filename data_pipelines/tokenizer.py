"""Sentencepiece tokenizer with the project's reserved special tokens at fixed ids.

Ids 0..8 are `model.special_tokens.SPECIAL_TOKENS` (`<pad> <unk> <bos> <eos> <boi> <eoi>
<bov> <eov> <latent>`) in every tokenizer trained here. Training uses identity
normalisation and byte fallback, so decode(encode(text)) == text for any text.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from model.special_tokens import SPECIAL_TOKENS
from model.config_system import InputMissing


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise InputMissing(f"{path}: tokenizer model not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        for i, piece in enumerate(SPECIAL_TOKENS):
            if self.sp.id_to_piece(i) != piece:
                raise ValueError(f"{path}: id {i} is {self.sp.id_to_piece(i)!r}, expected {piece!r} "
                                 "(not trained by data_pipelines.train_tokenizer?)")
        self.special = {piece.strip("<>"): i for i, piece in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_id(self, name: str) -> int:
        """Id of a special token by name: 'boi' or '<boi>'."""
        key = name.strip("<>")
        if key not in self.special:
            raise KeyError(f"special token {name!r} is not one of {', '.join(SPECIAL_TOKENS)}")
        return self.special[key]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    def fingerprint(self) -> str:
        return fingerprint_of(self.path.read_bytes())


def fingerprint_of(content: bytes) -> str:
    """The fingerprint of a tokenizer file's bytes, as manifests and checkpoints record it."""
    return hashlib.sha256(content).hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int, model_type: str = "bpe",
                    max_sentence_length: int = 16384) -> Tokenizer:
    """Train a sentencepiece model on `texts` (one sentence per item) and write it to `out`."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type: {model_type!r} is not one of bpe|unigram")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_user = len(SPECIAL_TOKENS) - 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t), model_prefix=str(out.with_suffix("")),
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>",
        user_defined_symbols=list(SPECIAL_TOKENS[4:4 + n_user]),
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, character_coverage=1.0, max_sentence_length=max_sentence_length,
        train_extremely_large_corpus=False, minloglevel=2)
    written = out.with_suffix(".model")
    if written != out:
        written.replace(out)
    out.with_suffix(".vocab").unlink(missing_ok=True)
    return Tokenizer(out)


def adopt_tokenizer(source: str | Path, out: str | Path) -> tuple[Tokenizer, list[int]]:
    """A sentencepiece model made by others (e.g. a Hugging Face Llama's `tokenizer.model`) with the
    project's special tokens put first: the source's unk, bos, eos (and pad) pieces become `<unk>`,
    `<bos>`, `<eos>` (`<pad>`), the other reserved pieces are added, and every other piece keeps its
    order after them; text encodes to the same pieces. Returns the tokenizer written to `out` and
    `new_id[old_id]` for every id of the source (so that embedding rows can follow their pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    source, out = Path(source), Path(out)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(source.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ValueError(f"{source}: not a sentencepiece model ({e})") from None
    if not proto.pieces:  # an empty file parses as a model of no pieces
        raise ValueError(f"{source}: not a sentencepiece model (no pieces; {source.stat().st_size} bytes)")
    spec, kinds = proto.trainer_spec, pb.ModelProto.SentencePiece
    roles = {}  # old id -> the reserved piece it becomes
    for i, p in enumerate(proto.pieces):
        if p.type == kinds.UNKNOWN:
            roles[i] = "<unk>"
        elif p.type == kinds.CONTROL and p.piece in (spec.bos_piece or "<s>", spec.eos_piece or "</s>",
                                                      spec.pad_piece or "<pad>"):
            roles[i] = {spec.bos_piece or "<s>": "<bos>", spec.eos_piece or "</s>": "<eos>"}.get(p.piece, "<pad>")
        elif p.piece in SPECIAL_TOKENS:
            raise ValueError(f"{source}: piece {i} is {p.piece!r}, a name the project reserves")
    kept = [i for i in range(len(proto.pieces)) if i not in roles]
    new = pb.ModelProto()
    new.CopyFrom(proto)
    del new.pieces[:]
    for i, name in enumerate(SPECIAL_TOKENS):
        piece = new.pieces.add()
        piece.piece, piece.score = name, 0.0
        piece.type = kinds.UNKNOWN if name == "<unk>" else kinds.CONTROL if i < 4 else kinds.USER_DEFINED
    for i in kept:
        new.pieces.append(proto.pieces[i])
    new.trainer_spec.unk_id, new.trainer_spec.bos_id, new.trainer_spec.eos_id, new.trainer_spec.pad_id = 1, 2, 3, 0
    new.trainer_spec.unk_piece, new.trainer_spec.bos_piece = "<unk>", "<bos>"
    new.trainer_spec.eos_piece, new.trainer_spec.pad_piece = "<eos>", "<pad>"
    new_id = [0] * len(proto.pieces)
    for old, name in roles.items():
        new_id[old] = SPECIAL_TOKENS.index(name)
    for position, old in enumerate(kept):
        new_id[old] = len(SPECIAL_TOKENS) + position
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(new.SerializeToString())
    return Tokenizer(out), new_id
