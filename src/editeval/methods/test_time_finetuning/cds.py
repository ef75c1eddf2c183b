"""CDS: Contrastive Denoising Score, DDS with a contrastive loss that keeps the source's structure.

Paper: "Contrastive Denoising Score for Text-guided Latent Diffusion Image Editing", Nam, Kwon,
Park, Kim and Ye, CVPR 2024, arXiv:2311.18608 (official code: HyelinNAM/ContrastiveDenoisingScore).
The survey files it under test-time finetuning, latent variable optimisation.

Algorithm (as the official ``pipeline_cds.py``): DDS (:mod:`editeval.methods.test_time_finetuning.dds`)
with the official defaults there (SGD, learning rate 0.1, loss scale 2000, guidance 7.5,
timesteps in [50, 949), ``num_iterations`` 200), plus at every iteration the CUT loss
``w_cut`` (3.0) * sum over the decoder's self-attention layers of PatchNCE
(:func:`editeval.diffusion.latent_optimisation.patch_nce_loss`: ``n_patches`` 256 positions,
patch sizes 1 and 2) between the layer's output at the noised source (conditional branch of the
DDS pass, detached) and at the noised optimised latent under the target prompt (a second UNet
pass, differentiated); the DDS term is weighted by ``w_dds`` (1.0).

Deviations: the second pass runs the conditional branch only (the official batch also holds the
unconditional one, whose output enters no loss); the weights stay frozen (the official code sets
the self-attention weights' requires_grad, which changes no latent gradient); timesteps, noise and
patch positions from the edit's generator; the UNet in the pipeline's dtype, the latent in float32.

NFE = 5 * num_iterations (the DDS batch of 4 and the target pass); num_iterations backward passes
through the UNet (the contrastive loss; none when w_cut is 0, which is DDS with a 5th NFE a step).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler, noise_level_terms
from editeval.diffusion.latent_optimisation import (
    attention_outputs,
    delta_denoising_score,
    optimise_latents,
    patch_nce_loss,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.methods.test_time_finetuning.dds import CARD as DDS_CARD
from editeval.methods.test_time_finetuning.dds import dds_check

CARD = MethodCard(
    name="cds",
    title="Contrastive Denoising Score",
    paper=Paper("Contrastive Denoising Score for Text-guided Latent Diffusion Image Editing",
                "CVPR", 2024, "2311.18608"),
    strategy="test-time-finetuning",
    subcategory="latent-variable-optimization",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={**DDS_CARD.defaults, "w_dds": 1.0, "w_cut": 3.0, "n_patches": 256,
              "patch_sizes": "1,2"},
    nfe_formula="5 * num_iterations (the DDS batch of 4 and the target pass)",
    backward_formula="num_iterations (0 when w_cut is 0)",
    deviations="second pass on the conditional branch only (official: also the unconditional "
               "one, which enters no loss); frozen weights; timesteps, noise and patches from "
               "the edit's generator; the UNet in the pipeline's dtype, the latent in float32",
    note="patch_sizes: comma-separated pooling sizes of the contrastive loss (official: 1,2).",
)


def _patch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"cds: patch_sizes={text!r}: give comma-separated sizes >= 1, as '1,2'")
    return sizes


def _check(*, w_dds: float, w_cut: float, n_patches: int, patch_sizes: str,
           **dds_params: Any) -> None:
    dds_check(**dds_params)
    if w_dds < 0 or w_cut < 0:
        raise ValueError(f"cds: w_dds and w_cut must be >= 0, got {w_dds} and {w_cut}")
    if n_patches < 1:
        raise ValueError(f"cds: n_patches must be >= 1, got {n_patches}")
    _patch_sizes(patch_sizes)


def _decoder_self_attention(name: str) -> bool:
    return name.startswith("up_blocks") and name.endswith("attn1")


@register_method(CARD, check=_check)
def cds(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_iterations: int,
        learning_rate: float, loss_scale: float, guidance_scale: float, t_min: int, t_max: int,
        w_dds: float, w_cut: float, n_patches: int, patch_sizes: str) -> MethodOutput:
    """Edit ``inputs.image`` by CDS optimisation of its latent (see the module)."""
    sizes = _patch_sizes(patch_sizes)
    scheduler = ddim_scheduler(pipe)
    high = min(t_max, int(scheduler.config.num_train_timesteps)) - 1
    if t_min >= high:
        raise ValueError(f"cds: t_min={t_min} leaves no timestep below min(t_max, "
                         f"{scheduler.config.num_train_timesteps}) - 1 = {high} for this model")
    source = encode_image(pipe, inputs.image)
    null, source_text, target_text = (encode_prompt(pipe, p) for p in
                                      ("", inputs.source_prompt, inputs.target_prompt))
    area = source.shape[-2] * source.shape[-1]
    unet = pipe.unet

    def loss(latents: torch.Tensor, _: int) -> torch.Tensor:
        timestep = int(torch.randint(t_min, high, (1,), generator=generator))
        noise = torch.randn(source.shape, generator=generator).to(source.device)
        with attention_outputs(unet, _decoder_self_attention) as features:
            delta = delta_denoising_score(unet, scheduler, source, latents, source_text,
                                          target_text, null, timestep, noise, guidance_scale)
            reference = {name: output[1:2].detach() for name, output in features.items()}
            total = w_dds * loss_scale * (latents * delta).sum() / area
            if w_cut == 0:
                return total
            sqrt_alpha, sqrt_one_minus = noise_level_terms(
                scheduler.alphas_cumprod[timestep], latents)
            noisy = sqrt_alpha * latents + sqrt_one_minus * noise.float()
            unet(noisy.to(unet.dtype), timestep, encoder_hidden_states=target_text)
            contrast = sum(patch_nce_loss(reference[name], output, sizes, n_patches, generator)
                           for name, output in features.items())
        return total + w_cut * contrast

    result = optimise_latents(source, loss, num_iterations, learning_rate, "cds: latent")
    return MethodOutput(decode_latents(pipe, result.latents), {
        "optimisation_steps": num_iterations,
        "latent_change": float((result.latents - source.float()).norm() / source.float().norm()),
    })
