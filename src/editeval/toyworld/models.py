"""Where the shipped toy models live: ``sd/`` (text-to-image), ``ip2p/`` (InstructPix2Pix),
``inpaint/`` (Stable Diffusion inpainting) and ``clip/`` (the toy CLIP, for CLIP-based metrics), diffusers/transformers folders in fp16 under
:data:`WEIGHTS`. They are trained and exported by :mod:`editeval.toylab`.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def checkpoint(kind: str) -> Path:
    """The shipped toy checkpoint ``kind`` ("sd", "ip2p", "inpaint" or "clip").

    Raises:
        FileNotFoundError: the weights are not in this installation (say how to train them).
    """
    path = WEIGHTS / kind
    if not (path / ("config.json" if kind == "clip" else "model_index.json")).exists():
        raise FileNotFoundError(
            f"toy {kind} weights not found at {path}; train and export them with "
            "`python -m editeval.toylab.training` (see its --help)"
        )
    return path
