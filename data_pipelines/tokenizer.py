"""The project's tokenizer: one interface, two back-ends, the reserved special tokens at fixed ids.

Ids 0..8 are `model.special_tokens.SPECIAL_TOKENS` (`<pad> <unk> <bos> <eos> <boi> <eoi> <bov> <eov>
<latent>`) in every tokenizer the project uses. Back-ends, told apart by a file's content:
- sentencepiece (`tokenizer.model`): trained here (`train_tokenizer`: identity normalisation and
  byte fallback) or adopted from a Llama's (`adopt_sentencepiece`);
- Hugging Face `tokenizers` (`tokenizer.json`, e.g. the byte-level BPE of Llama 3 or SmolLM2),
  adopted (`data_pipelines.tokenizer_json.adopt_tokenizer_json`).
`load_tokenizer(path)` opens either. decode(encode(text)) == text for any text, in both, except
that an adopted Llama sentencepiece model (with a '▁' prefix) encodes as transformers does: its
control pieces (`<pad> <unk> <bos> <eos>`) are matched in text, and spaces at the text's start or
next to an added token may change on decoding (as for a Llama 2-style `tokenizer.json`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from model.special_tokens import SPECIAL_TOKENS
from model.config_system import InputMissing

SENTENCEPIECE_FILE, JSON_FILE = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, JSON_FILE)  # the names a folder (checkpoint, release) holds its tokenizer by
ROLE_NAMES = ("<pad>", "<unk>", "<bos>", "<eos>")  # reserved tokens an adopted tokenizer's own tokens can become


class Tokenizer:
    """A tokenizer file with the project's reserved tokens at ids 0..8 (open one with `load_tokenizer`)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise InputMissing(f"{path}: tokenizer model not found")
        self.path = path
        self._open()
        for i, piece in enumerate(SPECIAL_TOKENS):
            if not self.has_reserved(i, piece):
                raise ValueError(f"{path}: id {i} is {self.id_to_piece(i)!r}, expected {piece!r} "
                                 "(not made by data_pipelines.train_tokenizer or import-llama?)")
        self.special = {piece.strip("<>"): i for i, piece in enumerate(SPECIAL_TOKENS)}

    def _open(self) -> None:
        raise NotImplementedError

    def has_reserved(self, i: int, name: str) -> bool:
        return self.id_to_piece(i) == name

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no reserved token added."""
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; the reserved tokens (ids 0..8) are dropped."""
        return self._decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    def token_id(self, name: str) -> int:
        """Id of a special token by name: 'boi' or '<boi>'."""
        key = name.strip("<>")
        if key not in self.special:
            raise KeyError(f"special token {name!r} is not one of {', '.join(SPECIAL_TOKENS)}")
        return self.special[key]

    def fingerprint(self) -> str:
        return fingerprint_of(self.path.read_bytes())


class SentencePieceTokenizer(Tokenizer):
    def _open(self) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = read_sentencepiece(self.path)
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        kinds = pb.ModelProto.SentencePiece
        user = [p.piece for p in proto.pieces if p.type in (kinds.USER_DEFINED, kinds.CONTROL, kinds.UNKNOWN)]
        self.split = None
        if proto.normalizer_spec.add_dummy_prefix:
            # encoded as transformers encodes a Llama's (Metaspace, prepend_scheme "first"): the text is
            # cut at its user-defined, control and unknown pieces first (a text "<eos>" is the end),
            # and only a part at the text's beginning that does not start with a space gets the '▁' prefix
            self.split = re.compile("(" + "|".join(map(re.escape, sorted(user, key=len, reverse=True))) + ")"
                                    if user else "(?!)")
            proto.normalizer_spec.add_dummy_prefix = False
            self.bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i) if i < self.sp.get_piece_size() else ""

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.split is None:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(self.split.split(text)):
            if k % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += (self.sp if k == 0 and not part.startswith(" ") else self.bare).encode(part)
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def is_json(content: bytes) -> bool:
    """Whether a tokenizer file is a `tokenizers` JSON document (else a sentencepiece protobuf)."""
    return content.lstrip()[:1] == b"{"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`, of the back-end its content says."""
    path = Path(path)
    if not path.is_file():
        raise InputMissing(f"{path}: tokenizer model not found")
    with open(path, "rb") as f:
        head = f.read(64)
    if is_json(head) or path.suffix == ".json":
        from data_pipelines.tokenizer_json import JsonTokenizer
        return JsonTokenizer(path)
    return SentencePieceTokenizer(path)


def file_name(content: bytes) -> str:
    """The name a folder holds a tokenizer file of this content by."""
    return JSON_FILE if is_json(content) else SENTENCEPIECE_FILE


def find_tokenizer(folder: str | Path) -> Optional[Path]:
    """The tokenizer file a folder (checkpoint, release) holds, if any."""
    return next((Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()), None)


def fingerprint_of(content: bytes) -> str:
    """The fingerprint of a tokenizer file's bytes, as manifests and checkpoints record it."""
    return hashlib.sha256(content).hexdigest()[:16]


def reserved_first(tokens: list[str], roles: dict[int, str], where: Path) -> tuple[list[int], dict[int, str]]:
    """Ids for an adopted tokenizer: `roles` (old id -> a name of ROLE_NAMES: the source's own unk,
    bos, eos, pad) take the reserved ids, a source token named as a free one of ROLE_NAMES takes it
    too, every other token keeps its order after the reserved ones. Returns (new_id[old_id], roles);
    a source token named as another reserved token is refused."""
    roles = dict(roles)
    for i, token in enumerate(tokens):
        if i not in roles and token in SPECIAL_TOKENS:
            if token not in ROLE_NAMES or token in roles.values():
                raise ValueError(f"{where}: token {i} is {token!r}, a name the project reserves")
            roles[i] = token
    if len(set(roles.values())) != len(roles):
        raise ValueError(f"{where}: two tokens would both become {sorted(roles.values())}")
    new_id, position = [0] * len(tokens), len(SPECIAL_TOKENS)
    for i in range(len(tokens)):
        if i in roles:
            new_id[i] = SPECIAL_TOKENS.index(roles[i])
        else:
            new_id[i], position = position, position + 1
    return new_id, roles


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
    return SentencePieceTokenizer(out)


def read_sentencepiece(path: Path):
    """The ModelProto of a sentencepiece file; an empty or unreadable one is a ValueError naming it."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:  # an empty file parses as a model of no pieces
        raise ValueError(f"{path}: not a sentencepiece model (no pieces; {path.stat().st_size} bytes)")
    return proto


def adopt_sentencepiece(source: str | Path, out: str | Path, roles: Optional[dict[int, str]] = None,
                        added: Optional[dict[int, str]] = None) -> tuple[Tokenizer, list[int]]:
    """A sentencepiece model made by others (e.g. a Hugging Face Llama's `tokenizer.model`) with the
    project's special tokens put first (`reserved_first`): the source's unk, bos, eos (and pad) pieces,
    and the ids `roles` names (old id -> one of ROLE_NAMES), become `<unk>`, `<bos>`, `<eos>`, `<pad>`.
    `added` (old id -> text: tokens a Hugging Face folder adds past the model's pieces, e.g.
    `<|im_start|>`, numbered on from the pieces) become user-defined pieces, matched in text as
    transformers matches them. Text encodes to the same pieces. Returns the tokenizer written to `out`
    and `new_id[old_id]` for every id up to the last added one (so that embedding rows can follow
    their tokens)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    source, out = Path(source), Path(out)
    proto = read_sentencepiece(source)
    spec, kinds, n = proto.trainer_spec, pb.ModelProto.SentencePiece, len(proto.pieces)
    added = dict(added or {})
    for i, text in list(added.items()):
        if i < n:
            if proto.pieces[i].piece != text:
                raise ValueError(f"{source}: added token {i} {text!r} is the model's piece {proto.pieces[i].piece!r}")
            del added[i]
    own = {}  # old id -> the reserved piece it becomes
    for i, p in enumerate(proto.pieces):
        if p.type == kinds.UNKNOWN:
            own[i] = "<unk>"
        elif p.type == kinds.CONTROL and p.piece in (spec.bos_piece or "<s>", spec.eos_piece or "</s>",
                                                      spec.pad_piece or "<pad>"):
            own[i] = {spec.bos_piece or "<s>": "<bos>", spec.eos_piece or "</s>": "<eos>"}.get(p.piece, "<pad>")
    for i, name in (roles or {}).items():  # the model's own roles first
        if i not in own and name not in own.values():
            own[i] = name
    if sorted(added) != list(range(n, n + len(added))):
        raise ValueError(f"{source}: the added tokens' ids {sorted(added)} do not follow its {n} pieces without a gap")
    tokens = [p.piece for p in proto.pieces] + [added[i] for i in sorted(added)]
    new_id, own = reserved_first(tokens, own, source)
    new = pb.ModelProto()
    new.CopyFrom(proto)
    del new.pieces[:]
    for i, name in enumerate(SPECIAL_TOKENS):
        piece = new.pieces.add()
        piece.piece, piece.score = name, 0.0
        piece.type = kinds.UNKNOWN if name == "<unk>" else kinds.CONTROL if i < 4 else kinds.USER_DEFINED
    for old in sorted((i for i in range(len(tokens)) if i not in own), key=new_id.__getitem__):
        if old < n:
            new.pieces.append(proto.pieces[old])
        else:
            piece = new.pieces.add()
            piece.piece, piece.score, piece.type = tokens[old], 0.0, kinds.USER_DEFINED
    new.trainer_spec.unk_id, new.trainer_spec.bos_id, new.trainer_spec.eos_id, new.trainer_spec.pad_id = 1, 2, 3, 0
    new.trainer_spec.unk_piece, new.trainer_spec.bos_piece = "<unk>", "<bos>"
    new.trainer_spec.eos_piece, new.trainer_spec.pad_piece = "<eos>", "<pad>"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(new.SerializeToString())
    return SentencePieceTokenizer(out), new_id


def adds_prefix_space(path: Path) -> bool:
    """Whether a sentencepiece model puts '▁' before the text (ours do not; Llama's do), which the
    Hugging Face tokenizer must be told to match."""
    return bool(read_sentencepiece(path).normalizer_spec.add_dummy_prefix)
