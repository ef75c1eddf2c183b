"""DDS: Delta Denoising Score, image editing by optimising the latent with a score difference.

Paper: "Delta Denoising Score", Hertz, Aberman and Cohen-Or, ICCV 2023, arXiv:2304.07090
(official code: the ``DDS_zeroshot`` notebook of google/prompt-to-prompt). The survey files it
under test-time finetuning, latent variable optimisation.

Algorithm (as the official notebook's zero-shot image editing):

1. ``zhat``: the source's VAE latent (posterior mean); ``z`` starts as a copy of it.
2. ``num_iterations`` (200) times: draw a timestep t uniformly in [t_min, min(t_max, T) - 1)
   ([50, 949) for SD's T = 1000) and one noise eps; noise ``zhat`` and ``z`` to t with the same
   eps; the direction ``delta = eps_w(z_t, target) - eps_w(zhat_t, source)`` with
   classifier-free guidance w = ``guidance_scale`` (7.5) and the empty prompt as the
   unconditional one (:func:`editeval.diffusion.latent_optimisation.delta_denoising_score`,
   no gradient through the UNet); one SGD step of size ``learning_rate`` (0.1) on the loss
   ``loss_scale * sum(z * delta) / (h w)`` (``loss_scale`` 2000, h x w the latent's size),
   i.e. ``z -= learning_rate * loss_scale * delta / (h w)``.
3. The edit is the decoded ``z``.

Deviations: timesteps and noise come from the edit's generator (the official loop from torch's
global generator); the UNet runs in the pipeline's dtype while the latent and its update are
float32 (official: the UNet under fp16 autocast, the latent in float32). On a model with a
smaller latent than SD's 64 x 64, the official normalisation by h x w makes each step larger.

NFE = 4 * num_iterations (one batch of 4 a step: unconditional and conditional, at the source's
and the optimised latent); no backward pass through the UNet (the score difference is taken
without a graph); num_iterations gradient steps on the latent.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.latent_optimisation import (
    delta_denoising_score,
    optimise_latents,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="dds",
    title="Delta Denoising Score",
    paper=Paper("Delta Denoising Score", "ICCV", 2023, "2304.07090"),
    strategy="test-time-finetuning",
    subcategory="latent-variable-optimization",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_iterations": 200, "learning_rate": 0.1, "loss_scale": 2000.0,
              "guidance_scale": 7.5, "t_min": 50, "t_max": 950},
    nfe_formula="4 * num_iterations (a batch of 4 a step)",
    backward_formula="0 (the score difference is taken without a graph; num_iterations "
                     "gradient steps on the latent)",
    deviations="timesteps and noise from the edit's generator; the UNet in the pipeline's dtype "
               "(official: fp16 autocast), the latent optimised in float32",
    note="Optimisation-based: no inversion, no sampling loop. The official step normalises by "
         "the latent's area (64 x 64 on SD 1.x at 512 px), so smaller latents take larger steps.",
)


def dds_check(*, num_iterations: int, learning_rate: float, loss_scale: float,
              guidance_scale: float, t_min: int, t_max: int) -> None:
    """Refuse DDS parameters out of range (ValueError naming the parameter); shared by CDS."""
    if num_iterations < 1:
        raise ValueError(f"dds: num_iterations must be >= 1, got {num_iterations}")
    if learning_rate <= 0 or loss_scale <= 0:
        raise ValueError(f"dds: learning_rate and loss_scale must be > 0, got {learning_rate} "
                         f"and {loss_scale}")
    if guidance_scale < 0:
        raise ValueError(f"dds: guidance_scale must be >= 0, got {guidance_scale}")
    if not 0 <= t_min < t_max - 1:
        raise ValueError(f"dds: timesteps are drawn from [t_min, t_max - 1): give 0 <= t_min < "
                         f"t_max - 1, got t_min={t_min}, t_max={t_max}")


@register_method(CARD, check=dds_check)
def dds(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_iterations: int,
        learning_rate: float, loss_scale: float, guidance_scale: float, t_min: int,
        t_max: int) -> MethodOutput:
    """Edit ``inputs.image`` by DDS optimisation of its latent (see the module)."""
    scheduler = ddim_scheduler(pipe)
    high = min(t_max, int(scheduler.config.num_train_timesteps)) - 1
    if t_min >= high:
        raise ValueError(f"dds: t_min={t_min} leaves no timestep below min(t_max, "
                         f"{scheduler.config.num_train_timesteps}) - 1 = {high} for this model")
    source = encode_image(pipe, inputs.image)
    texts = [encode_prompt(pipe, p) for p in ("", inputs.source_prompt, inputs.target_prompt)]
    area = source.shape[-2] * source.shape[-1]

    def loss(latents: torch.Tensor, _: int) -> torch.Tensor:
        timestep = int(torch.randint(t_min, high, (1,), generator=generator))
        noise = torch.randn(source.shape, generator=generator).to(source.device)
        delta = delta_denoising_score(pipe.unet, scheduler, source, latents, texts[1], texts[2],
                                      texts[0], timestep, noise, guidance_scale)
        return loss_scale * (latents * delta).sum() / area

    result = optimise_latents(source, loss, num_iterations, learning_rate, "dds: latent")
    return MethodOutput(decode_latents(pipe, result.latents), {
        "optimisation_steps": num_iterations,
        "latent_change": float((result.latents - source.float()).norm() / source.float().norm()),
    })
