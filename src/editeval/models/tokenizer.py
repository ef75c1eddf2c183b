"""The CLIP tokenizer, offline.

The real CLIP BPE vocabulary ships inside the ``open_clip_torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``); a ``CLIPTokenizer`` built from it gives exactly the
token ids of ``openai/clip-vit-large-patch14``, so word-to-token alignment (Prompt-to-Prompt) works
as on a real model, and the tiny and toy models need no download.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path

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
