"""A character-level tokenizer for the built-in tasks (no downloads, no vocabulary files)."""

from __future__ import annotations

import json

import torch

DEFAULT_ALPHABET = "0123456789+-*=;# "


class CharTokenizer:
    """One id per character, plus <pad> = 0, <bos> = 1, <eos> = 2."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.char_to_id = {c: i + len(self.specials) for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.alphabet)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self.char_to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}") from None
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eos_token_id and stop_at_eos:
                break
            if i >= len(self.specials):
                out.append(self.alphabet[i - len(self.specials)])
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "alphabet": self.alphabet})

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        data = json.loads(text)
        if data.get("type") != "char":
            raise ValueError(f"not a char tokenizer: {data.get('type')!r}")
        return cls(data["alphabet"])
