"""Exporting the trained toy models as diffusers pipelines, and where the shipped ones live.

``export(work)`` writes, in fp16 safetensors, under :data:`WEIGHTS` (inside the package):

- ``sd/``: ``StableDiffusionPipeline`` (toy VAE, CLIP text tower, CLIP tokenizer, UNet, SD 1.5's
  PNDM scheduler configuration);
- ``ip2p/``: ``StableDiffusionInstructPix2PixPipeline`` (the 8-channel UNet, Euler ancestral
  scheduler); its VAE, text encoder and tokenizer are symbolic links to ``sd/``'s;
- ``clip/``: the full toy ``CLIPModel`` with a ``CLIPProcessor`` (for CLIP-based metrics); its
  ``tokenizer.json`` is a link to ``sd/``'s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def checkpoint(kind: str) -> Path:
    """The shipped toy checkpoint ``kind`` ("sd", "ip2p" or "clip").

    Raises:
        FileNotFoundError: the weights are not in this installation (say how to train them).
    """
    path = WEIGHTS / kind
    if not (path / ("config.json" if kind == "clip" else "model_index.json")).exists():
        raise FileNotFoundError(
            f"toy {kind} weights not found at {path}; train and export them with "
            "`python -m editeval.toyworld.training` (see its --help)"
        )
    return path


def export(work: Path, out: Path = WEIGHTS) -> None:
    """Assemble the trained checkpoints in ``work`` into diffusers/transformers folders in ``out``."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTextModel

    from editeval.testing import clip_tokenizer
    from editeval.toyworld.training import (
        SCHEDULE, latent_scale, load_weights, new_clip, new_unet, new_vae,
    )

    def load(model, name):
        load_weights(model, work / f"{name}.ckpt")
        return model.eval()

    vae = load(new_vae(), "vae_decoder" if (work / "vae_decoder.ckpt").exists() else "vae")
    vae.register_to_config(scaling_factor=latent_scale(work))
    clip = load(new_clip(), "clip")
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    tokenizer = clip_tokenizer()
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    shutil.rmtree(out, ignore_errors=True)
    sd = StableDiffusionPipeline(
        unet=load(new_unet(4), "unet"),
        scheduler=PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
                                steps_offset=1),
        **common)
    sd.to(torch.float16).save_pretrained(out / "sd")
    if (work / "ip2p.ckpt").exists():
        ip2p = StableDiffusionInstructPix2PixPipeline(
            unet=load(new_unet(8), "ip2p"), scheduler=EulerAncestralDiscreteScheduler(**SCHEDULE),
            **common)
        ip2p.to(torch.float16).save_pretrained(out / "ip2p")
        for name in SHARED_COMPONENTS:  # identical to sd's: link instead of a second copy
            shutil.rmtree(out / "ip2p" / name)
            os.symlink(Path("..") / "sd" / name, out / "ip2p" / name)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64},
                                         crop_size={"height": 64, "width": 64},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    clip.half().save_pretrained(out / "clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out / "clip")
    (out / "clip" / "tokenizer.json").unlink()  # the same file as sd's: link it
    os.symlink(Path("..") / "sd" / "tokenizer" / "tokenizer.json", out / "clip" / "tokenizer.json")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
             for p in out.iterdir()}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
