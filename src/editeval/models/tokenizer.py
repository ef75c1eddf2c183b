"""The CLIP tokenizer, offline, and prompt lengths in tokens.

The real CLIP BPE vocabulary ships inside the ``open_clip_torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``); a ``CLIPTokenizer`` built from it gives exactly the
token ids of ``openai/clip-vit-large-patch14``, so word-to-token alignment (Prompt-to-Prompt) works
as on a real model, and the tiny and toy models need no download.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from editeval.core.cache import cache_dir


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's BPE tokenizer into ``directory``.

    The merges come from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (shipped in the
    ``open_clip_torch`` wheel); the vocabulary is rebuilt the way CLIP builds it (256 byte symbols,
    the same with ``</w>``, one symbol per merge, then the two special tokens), 49408 entries.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    return directory


def clip_tokenizer(directory: str | os.PathLike | None = None):
    """A ``CLIPTokenizer`` (max length 77) equal to ``openai/clip-vit-large-patch14``'s, offline."""
    from transformers import CLIPTokenizer

    if directory is None:
        directory = cache_dir() / "clip-tokenizer"
    directory = Path(directory)
    if not (directory / "merges.txt").exists():
        write_clip_tokenizer_files(directory)
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def count_tokens(tokenizer: Any, prompt: str) -> int:
    """The number of tokens the text encoder sees for ``prompt``: its tokens plus the start and end
    tokens, untruncated (``"a cat"`` is 4 for CLIP). ``tokenizer`` is a transformers tokenizer."""
    return len(tokenizer(prompt, truncation=False, verbose=False).input_ids)


def truncate_prompt(tokenizer: Any, prompt: str, limit: int | None = None) -> str:
    """The longest prefix of ``prompt`` that ends at a word (a run of non-space characters) and has
    at most ``limit`` tokens (start and end included; default the tokenizer's
    ``model_max_length``, 77 for CLIP); ``prompt`` itself when it fits.

    Raises:
        ValueError: not even the first word fits.
    """
    limit = tokenizer.model_max_length if limit is None else limit
    if count_tokens(tokenizer, prompt) <= limit:
        return prompt
    ends = [match.end() for match in re.finditer(r"\S+", prompt)]
    low, high = 0, len(ends)  # ends[:low] fit (0 words always does), ends[high:] do not
    while high - low > 1:
        middle = (low + high) // 2
        if count_tokens(tokenizer, prompt[:ends[middle - 1]]) <= limit:
            low = middle
        else:
            high = middle
    if low == 0:
        raise ValueError(f"cannot truncate the prompt to {limit} tokens at a word: its first word "
                         f"alone has more ({prompt[:40]!r}...)")
    return prompt[:ends[low - 1]]
