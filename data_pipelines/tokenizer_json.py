"""The Hugging Face `tokenizers` back-end of the project's Tokenizer: a `tokenizer.json` (the
byte-level BPE of Llama 3, SmolLM2 and most open backbones), adopted with the reserved tokens first.

An adopted file is the source's with its tokens renumbered (`tokenizer.reserved_first`): its
bos/eos/pad/unk take ids 0..3 and keep their text (Llama 3's `<|end_of_text|>` is id 3, and its
text still encodes to it); a role it lacks gets the reserved name, which, like `<pad> <unk> <bos>
<eos>` in sentencepiece, is not matched in text; `<boi> ... <latent>` (4..8) are added tokens,
matched in text like sentencepiece's user-defined pieces. Every other token (vocabulary and
added tokens alike) keeps its order after them; the pre-tokenizer, normaliser, merges and decoder
are untouched (padding and truncation are dropped), so a text encodes to the same tokens. Its
post-processor puts the bos first, as transformers' tokenizers do for a Llama; the project's own
`encode` adds nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer, processors

from data_pipelines.tokenizer import ROLE_NAMES, Tokenizer, reserved_first
from model.special_tokens import BOS, SPECIAL_TOKENS


class JsonTokenizer(Tokenizer):
    def _open(self) -> None:
        try:
            self.hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
        self.size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

    def has_reserved(self, i: int, name: str) -> bool:
        """Ids 0..3 are roles, whatever their text (an adopted `<|end_of_text|>` is the end at id 3)."""
        return self.hf.id_to_token(i) is not None if i < len(ROLE_NAMES) else self.hf.token_to_id(name) == i

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(i) or ""

    @property
    def vocab_size(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)


def read_tokenizer_json(path: Path) -> dict:
    """The document of a BPE `tokenizer.json`; anything else is a ValueError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise ValueError(f"{path}: a {kind!r} tokenizer model; only BPE tokenizer.json files are adopted")
    if not isinstance(model.get("vocab"), dict) or not model["vocab"] or not isinstance(doc.get("added_tokens") or [], list):
        raise ValueError(f"{path}: not a tokenizers JSON file (no vocabulary of token: id)")
    return doc


def adopt_tokenizer_json(source: str | Path, out: str | Path,
                         roles: Optional[dict[int, str]] = None) -> tuple[Tokenizer, list[int]]:
    """A BPE `tokenizer.json` made by others with the project's reserved tokens first (module doc).
    `roles`: old id -> the reserved name it becomes (the source's bos, eos, pad; its BPE unk token
    becomes `<unk>` by itself); such a token's own text keeps encoding to it. Returns the tokenizer
    written to `out` and `new_id[old_id]` for every old id (so that embedding rows can follow
    their tokens)."""
    source, out = Path(source), Path(out)
    doc = read_tokenizer_json(source)
    model = doc["model"]
    try:
        by_id = {int(i): t for t, i in model["vocab"].items()}
        added = {int(a["id"]): a for a in doc.get("added_tokens") or []}
        for i, a in added.items():
            if by_id.setdefault(i, a["content"]) != a["content"]:
                raise ValueError(f"{source}: id {i} is both {by_id[i]!r} and the added token {a['content']!r}")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: not a tokenizers JSON file ({type(e).__name__}: {e})") from None
    if len(by_id) != max(by_id) + 1:
        hole = min(set(range(max(by_id) + 1)) - set(by_id))
        raise ValueError(f"{source}: no token has id {hole} (ids must run from 0 without a gap)")
    tokens = [by_id[i] for i in range(len(by_id))]
    if len(set(tokens)) != len(tokens):
        twice = next(t for t in tokens if tokens.count(t) > 1)
        raise ValueError(f"{source}: the token {twice!r} has two ids")
    own = {}
    if model.get("unk_token") is not None and model["unk_token"] in model["vocab"]:
        own[model["vocab"][model["unk_token"]]] = "<unk>"
    for i, name in (roles or {}).items():
        if 0 <= i < len(tokens) and i not in own and name not in own.values():  # not a row past the tokens
            own[i] = name
    new_id, own = reserved_first(tokens, own, source)
    # a role token keeps its text (the source's `<|end_of_text|>` is id 3: its text encodes to it as
    # before, and a text "<eos>" stays text, as in sentencepiece); a role the source lacks gets the
    # reserved name, not matched in text; the other reserved tokens are matched, as user-defined pieces
    names = {**dict(enumerate(ROLE_NAMES)), **{new_id[i]: tokens[i] for i in own}}
    model["vocab"] = {**{names[i]: i for i in range(len(ROLE_NAMES))},
                      **{name: i for i, name in enumerate(SPECIAL_TOKENS) if i >= len(ROLE_NAMES)},
                      **{t: new_id[i] for i, t in enumerate(tokens)}}
    reserved = [{"id": i, "content": SPECIAL_TOKENS[i], "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i in range(len(ROLE_NAMES), len(SPECIAL_TOKENS))]
    doc["added_tokens"] = sorted(reserved + [dict(a, id=new_id[i]) for i, a in added.items()], key=lambda a: a["id"])
    doc["padding"] = doc["truncation"] = None  # the source's would cut or pad every encoding
    try:
        hf = HFTokenizer.from_str(json.dumps(doc))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(f"{source}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    bos = names[BOS]
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                      special_tokens=[(bos, BOS)])
    out.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(out))
    return JsonTokenizer(out), new_id
