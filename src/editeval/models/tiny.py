"""Tiny random-weight Stable Diffusion, InstructPix2Pix and inpainting pipelines, built offline.

They have Stable Diffusion's architecture at toy size, so every code path a real checkpoint takes
(``from_pretrained``, schedulers, classifier-free guidance, attention processors) runs in seconds on a
CPU. They produce noise, not pictures: use them for plumbing, determinism and cost tests, never for
quality claims.

- UNet: ``UNet2DConditionModel`` with cross-attention at two resolutions (latent 8x8 and 4x4);
  its output layer is scaled by 0.1 so that, like a trained model and unlike a raw random one,
  its noise prediction does not swing wildly with the input (DDIM inversion stays bounded).
- VAE: ``AutoencoderKL`` with SD's downsampling factor 8 (64x64 RGB -> 8x8x4 latents).
- Text encoder: a 2-layer ``CLIPTextModel`` with the real CLIP vocabulary size (49408).
- Tokenizer: :func:`editeval.models.tokenizer.clip_tokenizer`, built from the CLIP BPE vocabulary shipped in ``open_clip_torch``;
  its ids equal those of ``openai/clip-vit-large-patch14``.
- Schedulers as the real checkpoints ship them: SD 1.5's ``PNDMScheduler`` (scaled_linear betas
  0.00085..0.012, 1000 steps; also SD 1.5 inpainting's) and InstructPix2Pix's
  ``EulerAncestralDiscreteScheduler``.
- ``inpaint``: ``StableDiffusionInpaintPipeline`` with a 9-channel UNet (noisy latents, mask,
  masked-image latents), as ``stable-diffusion-v1-5/stable-diffusion-inpainting``.
- ``sd-v``: the same pipeline (same weights) whose scheduler says ``prediction_type="v_prediction"``,
  as Stable Diffusion 2.x at 768 px ships: the denoiser's output is read as v, not as noise.

Pipelines are saved in diffusers format under the editeval cache directory and loaded through
:func:`editeval.models.load_pipeline`, exactly as a user's checkpoint would be.
"""

from __future__ import annotations

import os
from functools import lru_cache, partial
from pathlib import Path

import torch

from editeval.core.cache import build_once, cache_dir
from editeval.models.progress import quiet_progress_bars
from editeval.models.tokenizer import clip_tokenizer

TINY_SEED = 0
TINY_VERSION = 1  # bump when the builders change, so stale cached checkpoints are not reused
TINY_RESOLUTION = 64
_SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def _components(in_channels: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with torch.no_grad():  # damped output: DDIM trajectories stay bounded, as a trained model's do
        unet.conv_out.weight.mul_(0.1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer())


def build_tiny_sd(path: str | os.PathLike, prediction_type: str = "epsilon") -> Path:
    """Build the tiny text-to-image pipeline (SD 1.5 layout) and save it to ``path``.

    ``prediction_type``: what the scheduler reads the denoiser's output as (``epsilon``,
    ``v_prediction`` or ``sample``); the weights are the same whatever it is.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(**_components(4), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_ip2p(path: str | os.PathLike) -> Path:
    """Build the tiny InstructPix2Pix pipeline (8 UNet input channels) and save it to ``path``."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    scheduler = EulerAncestralDiscreteScheduler(**_SD_SCHEDULE)
    pipe = StableDiffusionInstructPix2PixPipeline(
        **_components(8), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_inpaint(path: str | os.PathLike) -> Path:
    """Build the tiny inpainting pipeline (9 UNet input channels) and save it to ``path``."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    scheduler = PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        **_components(9), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


_VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_vlm(path: str | os.PathLike) -> Path:
    """Build a tiny random LLaVA-architecture vision-language model with its processor (the CLIP
    tokenizer plus an ``<image>`` token, a chat template) and save it to ``path``; it loads through
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` like a real judge model."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.model_max_length = 4096  # judge prompts are long
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        chat_template=_VLM_CHAT_TEMPLATE, num_additional_image_tokens=1)
    torch.manual_seed(TINY_SEED)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16,
                                       intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=4096).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


@lru_cache(maxsize=None)
def tiny_checkpoint(kind: str) -> Path:
    """Path of the saved tiny checkpoint of ``kind`` ("sd", "sd-v", "ip2p", "inpaint" or "vlm"),
    built on first use."""
    builders = {"sd": build_tiny_sd, "sd-v": partial(build_tiny_sd, prediction_type="v_prediction"),
                "ip2p": build_tiny_ip2p, "inpaint": build_tiny_inpaint, "vlm": build_tiny_vlm}
    with quiet_progress_bars():
        return build_once(cache_dir() / "tiny" / f"v{TINY_VERSION}" / kind, "model_index.json",
                          builders[kind])
