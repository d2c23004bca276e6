"""Token windows from a text file, with the model's own tokenizer (offline)."""

from __future__ import annotations

from pathlib import Path

import torch


def tokenize_prefix(model_dir: Path, text_path: Path, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` token ids of ``text_path`` (no special tokens): ``[num_tokens]``.

    Tokenizes a growing prefix of the text so a 9 MB file is not tokenized whole.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = Path(text_path).read_text()
    chars = max(num_tokens * 8, 4096)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False).ids
        if len(ids) > num_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < num_tokens:
        raise ValueError(f"{text_path} has only {len(ids)} tokens, {num_tokens} needed")
    return torch.tensor(ids[:num_tokens], dtype=torch.long)


def windows(model_dir: Path, text_path: Path, context: int, tokens: int) -> list[torch.Tensor]:
    """``ceil(tokens / context)`` consecutive windows of ``context + 1`` ids (input + next-token
    targets); consecutive windows overlap by one id, so each evaluates ``context`` new tokens."""
    count = max(1, -(-tokens // context))
    ids = tokenize_prefix(model_dir, text_path, count * context + 1)
    return [ids[i * context : (i + 1) * context + 1] for i in range(count)]
