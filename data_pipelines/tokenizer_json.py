"""The Hugging Face `tokenizers` back-end of the project's Tokenizer: a `tokenizer.json` (the
byte-level BPE of Llama 3, SmolLM2 and most open backbones), adopted with the reserved tokens first.

An adopted file is the source's with its tokens renumbered (`tokenizer.reserved_first`): the
reserved tokens are added tokens at ids 0..8, the source's bos/eos/pad/unk are renamed to theirs,
every other token (vocabulary and added tokens alike) keeps its order after them; the pre-tokenizer,
normaliser, merges and decoder are untouched, so a text encodes to the same tokens. Its
post-processor puts `<bos>` first, as transformers' tokenizers do for a Llama; the project's own
`encode` adds nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer, processors

from data_pipelines.tokenizer import Tokenizer, reserved_first
from model.special_tokens import BOS, SPECIAL_TOKENS


class JsonTokenizer(Tokenizer):
    def _open(self) -> None:
        try:
            self.hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(i) or ""

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

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
    kind = (doc.get("model") or {}).get("type") if isinstance(doc, dict) else None
    if kind != "BPE":
        raise ValueError(f"{path}: a {kind!r} tokenizer model; only BPE tokenizer.json files are adopted")
    if not doc["model"].get("vocab"):
        raise ValueError(f"{path}: not a tokenizers JSON file (an empty vocabulary)")
    return doc


def adopt_tokenizer_json(source: str | Path, out: str | Path,
                         roles: Optional[dict[int, str]] = None) -> tuple[Tokenizer, list[int]]:
    """A BPE `tokenizer.json` made by others with the project's reserved tokens first (module doc).
    `roles`: old id -> the reserved name it becomes (the source's bos, eos, pad; its BPE unk token
    becomes `<unk>` by itself). Returns the tokenizer written to `out` and `new_id[old_id]` for
    every old id (so that embedding rows can follow their tokens)."""
    source, out = Path(source), Path(out)
    doc = read_tokenizer_json(source)
    model = doc["model"]
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in doc.get("added_tokens") or []}
    for i, a in added.items():
        if by_id.setdefault(i, a["content"]) != a["content"]:
            raise ValueError(f"{source}: id {i} is both {by_id[i]!r} and the added token {a['content']!r}")
    if len(by_id) != max(by_id) + 1:
        hole = min(set(range(max(by_id) + 1)) - set(by_id))
        raise ValueError(f"{source}: no token has id {hole} (ids must run from 0 without a gap)")
    tokens = [by_id[i] for i in range(len(by_id))]
    own = {}
    if model.get("unk_token") is not None and model["unk_token"] in model["vocab"]:
        own[model["vocab"][model["unk_token"]]] = "<unk>"
    for i, name in (roles or {}).items():
        if i not in own and name not in own.values():
            own[i] = name
    new_id, own = reserved_first(tokens, own, source)
    renamed = {tokens[i]: name for i, name in own.items()}
    for merge in model.get("merges") or []:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        for text in (*parts, "".join(parts)):
            if text in renamed:
                raise ValueError(f"{source}: {text!r} would become {renamed[text]}, but a BPE merge builds it")
    model["vocab"] = {**{name: i for i, name in enumerate(SPECIAL_TOKENS)},
                      **{tokens[i]: new_id[i] for i in range(len(tokens)) if i not in own}}
    if model.get("unk_token") is not None:
        model["unk_token"] = "<unk>" if "<unk>" in own.values() else None
    reserved = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, name in enumerate(SPECIAL_TOKENS)]
    doc["added_tokens"] = reserved + sorted((dict(a, id=new_id[i]) for i, a in added.items() if i not in own),
                                            key=lambda a: a["id"])
    hf = HFTokenizer.from_str(json.dumps(doc))
    hf.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                                      special_tokens=[("<bos>", BOS)])
    out.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(out))
    return JsonTokenizer(out), new_id
