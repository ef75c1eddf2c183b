"""The toy models' architectures (Stable Diffusion's, at toy size) and their training checkpoints.

Shared by training (:mod:`editeval.toylab.training`) and export (:mod:`editeval.toylab.export`):
``new_vae``, ``new_clip`` and ``new_unet`` build the models; ``save_checkpoint`` and
``load_weights`` write and read a training checkpoint (model, optimiser, step, random state), which
records the architecture it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from editeval.core.files import atomic_write

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")
TEXT_DIM = 64

VAE_WIDTHS = (8, 16, 32, 64)  # the VAE trained from scratch (``vae``): its latents are the UNets'
WIDE_VAE_WIDTHS = (16, 32, 64, 128)  # the shipped VAE (``widen``), in the same latent space


def new_vae(block_out_channels: tuple[int, ...] = VAE_WIDTHS):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=8,
    )


def load_vae(path: Path):
    """The VAE of the checkpoint ``path``, at the widths it records (``vae.ckpt`` holds the VAE
    trained from scratch, or after ``import`` the exported wide one), in eval mode, frozen."""
    widths = torch.load(path, weights_only=False)["config"]["block_out_channels"]
    vae = new_vae(widths)
    load_weights(vae, path)
    return vae.eval().requires_grad_(False)


def new_clip():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=256,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=TEXT_DIM,
                              intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=TEXT_DIM))


def new_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # diffusers reads ``attention_head_dim`` as the number of heads (its issue #2011), as SD
        # 1.5's config does (8 heads): 4 heads of width 16 / 32 here
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=32,
    )


def model_config(model: torch.nn.Module) -> dict:
    """The architecture of a diffusers or transformers model, as plain JSON values."""
    config = model.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {k: v for k, v in config.items()
              if not k.startswith("_") and k != "transformers_version"}
    return json.loads(json.dumps(config, default=str))


def load_weights(model: torch.nn.Module, path: Path) -> dict:
    """Load the checkpoint ``path`` into ``model``; returns the whole checkpoint.

    Raises:
        ValueError: the checkpoint records another architecture, or none (the weights of a model
            with the same tensor shapes but, say, another number of attention heads would load
            silently and compute something else).
    """
    state = torch.load(path, weights_only=False)
    expected, stored = model_config(model), state.get("config")
    if stored != expected:
        differs = ("not recorded" if stored is None else
                   ", ".join(k for k in expected if stored.get(k) != expected[k]))
        raise ValueError(f"{path} was trained with another model architecture ({differs}); "
                         "train into a new --work folder or delete the checkpoint")
    model.load_state_dict(state["model"])
    return state


def save_checkpoint(path: Path, model: torch.nn.Module, step: int, *, optimizer: dict | None,
                    numpy_rng: dict, torch_rng: torch.Tensor, warmup_from: int = 0,
                    restart: dict | None = None) -> None:
    """Write a training checkpoint atomically (a killed write leaves the previous one whole).

    ``optimizer`` is the AdamW state, or None for weights imported from an export (the run then
    starts a fresh optimiser, whose learning rate warms up again from ``warmup_from``).
    ``restart`` is the restarted cosine schedule the run follows (``Checkpointed.train``), or
    None for the stage's own schedule from step 0.
    """
    state = {"model": model.state_dict(), "config": model_config(model), "optimizer": optimizer,
             "step": step, "warmup_from": warmup_from, "restart": restart,
             "numpy_rng": numpy_rng, "torch_rng": torch_rng}
    atomic_write(path, lambda f: torch.save(state, f))


def read_latent_scale(work: Path) -> float:
    """The VAE latents' scaling factor that training stored in ``work`` (``latent_scale.json``).

    Raises:
        FileNotFoundError: not computed yet (the ``unet`` stage computes it).
    """
    path = work / "latent_scale.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the unet stage first, which computes it")
    return json.loads(path.read_text())["scaling_factor"]
