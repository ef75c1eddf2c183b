"""Exporting the trained toy models as diffusers pipelines, and importing them back.

``export(work)`` writes, in fp16 safetensors, under :data:`WEIGHTS` (inside the package):

- ``sd/``: ``StableDiffusionPipeline`` (toy VAE, CLIP text tower, CLIP tokenizer, UNet, SD 1.5's
  PNDM scheduler configuration);
- ``ip2p/``: ``StableDiffusionInstructPix2PixPipeline`` (the 8-channel UNet, Euler ancestral
  scheduler); its VAE, text encoder and tokenizer are symbolic links to ``sd/``'s;
- ``inpaint/``: ``StableDiffusionInpaintPipeline`` (the 9-channel UNet); its VAE, text encoder,
  tokenizer and scheduler (SD's PNDM, as SD 1.5 inpainting ships) are links to ``sd/``'s;
- ``clip/``: the full toy ``CLIPModel`` with a ``CLIPProcessor`` (for CLIP-based metrics); its
  ``tokenizer.json`` is a link to ``sd/``'s;
- ``training.json``: the optimiser step each model was trained to.

``import_checkpoints(work)`` is the inverse: training checkpoints from the exported weights, so that
training resumes from the shipped models on a machine that has only the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from editeval.models.tokenizer import clip_tokenizer
from editeval.toylab.models import (
    SCHEDULE, load_vae, load_weights, model_config, new_clip, new_unet, new_vae, read_latent_scale,
    save_checkpoint,
)
from editeval.toyworld.models import WEIGHTS

SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer")
# training checkpoint -> exported folder and subfolder that hold its model
EXPORTED = {"vae": ("sd", "vae"), "vae_wide": ("sd", "vae"), "clip": ("clip", ""),
            "unet": ("sd", "unet"), "ip2p": ("ip2p", "unet"), "inpaint": ("inpaint", "unet")}
# the UNet's input channels of each exported UNet checkpoint
UNET_INPUTS = {"unet": 4, "ip2p": 8, "inpaint": 9}

def export(work: Path, out: Path = WEIGHTS) -> None:
    """Assemble the trained checkpoints in ``work`` into diffusers/transformers folders in ``out``."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTextModel


    def load(model, name):
        load_weights(model, work / f"{name}.ckpt")
        return model.eval()

    vae = load_vae(work / ("vae_wide.ckpt" if (work / "vae_wide.ckpt").exists() else "vae.ckpt"))
    vae.register_to_config(scaling_factor=read_latent_scale(work))
    clip = load(new_clip(), "clip")
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    tokenizer = clip_tokenizer()
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    shutil.rmtree(out, ignore_errors=True)
    pndm = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    sd = StableDiffusionPipeline(unet=load(new_unet(4), "unet"), scheduler=pndm, **common)
    sd.to(torch.float16).save_pretrained(out / "sd")
    derived = {"ip2p": (StableDiffusionInstructPix2PixPipeline,
                        EulerAncestralDiscreteScheduler(**SCHEDULE), SHARED_COMPONENTS),
               "inpaint": (StableDiffusionInpaintPipeline, pndm,
                           (*SHARED_COMPONENTS, "scheduler"))}
    for name, (pipeline, scheduler, shared) in derived.items():
        if not (work / f"{name}.ckpt").exists():
            continue
        unet = load(new_unet(UNET_INPUTS[name]), name)
        pipeline(unet=unet, scheduler=scheduler, **common).to(torch.float16).save_pretrained(
            out / name)
        for component in shared:  # identical to sd's: link instead of a second copy
            shutil.rmtree(out / name / component)
            os.symlink(Path("..") / "sd" / component, out / name / component)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64},
                                         crop_size={"height": 64, "width": 64},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    clip.half().save_pretrained(out / "clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out / "clip")
    (out / "clip" / "tokenizer.json").unlink()  # the same file as sd's: link it
    os.symlink(Path("..") / "sd" / "tokenizer" / "tokenizer.json", out / "clip" / "tokenizer.json")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
             for p in out.iterdir() if p.is_dir()}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    steps = {name: torch.load(work / f"{name}.ckpt", weights_only=False)["step"]
             for name in EXPORTED if (work / f"{name}.ckpt").exists()}
    (out / "training.json").write_text(json.dumps(steps, indent=1))


def _architecture(config: dict) -> dict:
    """``config`` without what saving adds or export sets (dtype, class names, latent scale)."""
    return {k: _architecture(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in ("architectures", "dtype", "torch_dtype", "scaling_factor")}


def import_checkpoints(work: Path, weights: Path = WEIGHTS, seed: int = 0) -> dict[str, int]:
    """Write training checkpoints into ``work`` from the exported weights in ``weights``, so that
    any stage resumes from them; returns the step of each checkpoint written.

    Each checkpoint gets the step its model was trained to (``training.json``), the weights in
    fp32 (from the exported fp16) and no optimiser state (AdamW's moments are not exported): the
    resumed stage starts a fresh optimiser, warms its learning rate up again over
    ``WARMUP_STEPS`` and then follows its cosine schedule from that step. ``vae.ckpt`` and
    ``vae_wide.ckpt`` both get the exported VAE, at its widths (the wide one, whose encoder was
    distilled to give the latents the UNets learnt on), and ``latent_scale.json`` its scaling
    factor.

    Raises:
        FileNotFoundError: ``weights`` has no ``training.json`` (export it again).
        FileExistsError: ``work`` already holds one of the checkpoints (importing would discard
            its training; use a new --work folder).
        ValueError: an exported model has another architecture than the training code builds.
    """
    import numpy as np
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel


    record = weights / "training.json"
    if not record.exists():
        raise FileNotFoundError(f"{record} not found: it records each model's training step; "
                                "export the weights again with a current editeval")
    steps = json.loads(record.read_text())
    existing = [name for name in steps if (work / f"{name}.ckpt").exists()]
    if existing:
        raise FileExistsError(f"{work} already holds {', '.join(existing)}.ckpt; importing would "
                              "discard that training: import into a new --work folder")
    def vae_like(exported):
        return new_vae(exported.config.block_out_channels)

    build = {"vae": (vae_like, AutoencoderKL), "vae_wide": (vae_like, AutoencoderKL),
             "clip": (lambda _: new_clip(), CLIPModel),
             **{name: (lambda _, c=channels: new_unet(c), UNet2DConditionModel)
                for name, channels in UNET_INPUTS.items()}}
    work.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        (new_model, loader), (folder, subfolder) = build[name], EXPORTED[name]
        exported = loader.from_pretrained(weights / folder / subfolder, torch_dtype=torch.float32)
        model = new_model(exported)
        expected, found = _architecture(model_config(model)), _architecture(model_config(exported))
        differs = [k for k in expected if found.get(k) != expected[k]]
        if differs:
            raise ValueError(f"{weights / folder} has another architecture than training builds "
                             f"for {name} ({', '.join(differs)})")
        model.load_state_dict(exported.state_dict())
        save_checkpoint(work / f"{name}.ckpt", model, step, optimizer=None,
                        numpy_rng=np.random.default_rng([seed, step]).bit_generator.state,
                        torch_rng=torch.Generator().manual_seed(seed + step).get_state(),
                        warmup_from=step)
        if name == "vae":
            (work / "latent_scale.json").write_text(
                json.dumps({"scaling_factor": exported.config.scaling_factor}))
    return steps
