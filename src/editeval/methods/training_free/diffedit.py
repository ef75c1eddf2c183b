"""DiffEdit: infer the edit region from two noise estimates, encode the source with DDIM, decode
the target prompt inside the region while outside it the encoding's own latents come back.

Paper: "DiffEdit: Diffusion-based semantic image editing with mask guidance", Couairon, Verbeek,
Schwenk and Cord, ICLR 2023, arXiv:2210.11427. The authors released no code; diffusers' (now
deprecated) ``StableDiffusionDiffEditPipeline`` is the reference implementation we checked the
details against.

Algorithm:

1. Mask. Noise the source latents to half the schedule (``mask_encode_strength`` 0.5: the
   timestep diffusers' img2img picks for that strength) with ``num_masks`` = n = 10 independent
   noise draws; for each draw predict the noise once under the source prompt (the paper's
   reference text R) and once under the target prompt (the query Q), from the *same* noisy
   latents. The map is |eps_Q - eps_R| averaged over the draws and the latent channels; its
   extreme values are removed by clamping at ``mask_thresholding_ratio`` (3) times its mean
   (diffusers), it is rescaled to [0, 1] and binarised at ``mask_threshold`` 0.5. Without the
   same draw under both prompts the map is noise, not the prompts' disagreement. Diffusers takes
   both estimates with classifier-free guidance against the same unconditional estimate; their
   difference is then the guidance scale times ours, which the relative threshold cancels, so we
   skip the unconditional passes. A map that is zero everywhere (identical prompts) gives an
   empty mask (diffusers divides by its zero mean and marks everything).
2. Encoding. DDIM-invert the source under the empty prompt at guidance 1 (the paper: "with the
   unconditional model") for the first floor(``encode_ratio`` x ``num_inference_steps``) steps,
   keeping every latent of the trajectory.
3. Decoding. From the last encoded latent, DDIM-sample the target prompt with classifier-free
   guidance; after every step the latents outside the mask are replaced by the encoding's latents
   of the same level, so outside the mask the decoding ends on the source's own latents.

Defaults: n = 10 draws at 50 % noise and threshold 0.5 (the paper), clamp ratio 3 (diffusers; the
paper only says extreme values are removed), 50 DDIM steps, guidance 7.5, encode ratio 0.8
(diffusers' ``inpaint_strength``; the paper sweeps the ratio to trade edit strength against
fidelity).

A given mask is not used (``--mask`` is ignored with a warning): DiffEdit's contribution is the
inferred mask, and the paper sets itself apart from editing methods that need one; use
``blended-latent-diffusion`` to edit inside a mask of your own. The inferred mask is returned as
the ``edit_region`` intermediate (latent resolution, 1 = edited), the rescaled map it was
thresholded from as ``difference_map``.

Deviations:
- The decoding replaces the latents outside the mask with the encoding's latent of the level the
  step arrives at (the paper's algorithm); diffusers pairs each step with the latent one level
  noisier and so never puts the clean source latents back.
- The encoding runs under the empty prompt at guidance 1 (the paper); diffusers' example inverts
  under the source prompt at guidance 7.5 and decodes with the source prompt as negative prompt.
- Not checked against the paper's text (we could not read it): the encode ratio 0.8 and the clamp
  ratio 3, both diffusers' defaults.

NFE = 2 * num_masks (the mask) + floor(num_inference_steps * encode_ratio) (the encoding; 0 when
the run's inversion cache holds it) + 2 * floor(num_inference_steps * encode_ratio) (the decoding
with guidance; 1x with guidance_scale 1).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    ddim_invert,
    ddim_scheduler,
    ddim_step,
    model_noise,
    noise_level_terms,
    noise_levels,
    predict_noise,
)
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="diffedit",
    title="DiffEdit",
    paper=Paper("DiffEdit: Diffusion-based semantic image editing with mask guidance", "ICLR",
                2023, "2210.11427"),
    strategy="training-free",
    subcategory="mask-guidance",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "encode_ratio": 0.8,
              "num_masks": 10, "mask_encode_strength": 0.5, "mask_thresholding_ratio": 3.0,
              "mask_threshold": 0.5},
    nfe_formula="2 * num_masks + 3 * floor(num_inference_steps * encode_ratio) (2 * floor(...) "
                "with guidance_scale 1; the encoding's floor(...) is 0 when cached)",
    deviations="masked decoding puts back the encoding's latent of the level each step reaches "
               "(diffusers: one level noisier); encoding under the empty prompt at guidance 1 "
               "(the paper; diffusers: source prompt at 7.5); encode ratio 0.8 and clamp ratio 3 "
               "are diffusers' defaults, not checked against the paper's text",
    note="Infers its own mask (intermediates: edit_region, difference_map); a given --mask is "
         "not used: for a mask of your own use blended-latent-diffusion.",
)


def decode_steps(num_inference_steps: int, strength: float) -> int:
    """Steps run from a strength (a fraction of the schedule): floor(steps x strength), as
    diffusers' img2img and DiffEdit pipelines count them."""
    return min(int(num_inference_steps * strength), num_inference_steps)


@torch.no_grad()
def noise_difference_map(unet: Any, scheduler: Any, latents: torch.Tensor, source: torch.Tensor,
                         target: torch.Tensor, noise: torch.Tensor,
                         timestep: torch.Tensor | int) -> torch.Tensor:
    """DiffEdit's map: mean |eps(z_n, target) - eps(z_n, source)| over the draws and channels.

    Args:
        unet, scheduler: the pipeline's UNet and a (DDIM) scheduler for its noise schedule.
        latents: (1, 4, h, w) clean source latents.
        source, target: (1, 77, D) embeddings of the reference and the query text.
        noise: (n, 4, h, w) standard normal draws; draw k noises the source to ``timestep`` as
            z_k = sqrt(a) latents + sqrt(1 - a) noise[k], seen under both prompts.
        timestep: the timestep to noise to (an entry of ``scheduler.timesteps``).

    Returns:
        (h, w) float32 on the CPU, >= 0. NFE = 2n (one UNet batch).
    """
    n = noise.shape[0]
    sqrt_alpha, sqrt_one_minus = noise_level_terms(scheduler.alphas_cumprod[int(timestep)],
                                                   latents.float())
    noisy = sqrt_alpha * latents.float() + sqrt_one_minus * noise.float().to(latents.device)
    rows = torch.cat([noisy, noisy]).to(unet.dtype)
    text = torch.cat([source.expand(n, -1, -1), target.expand(n, -1, -1)])
    eps = model_noise(unet, scheduler, rows, timestep, text).float()
    return (eps[n:] - eps[:n]).abs().mean(dim=(0, 1)).cpu()


def rescale_map(difference: torch.Tensor, ratio: float) -> torch.Tensor:
    """A difference map without its extreme values, in [0, 1]: clamped at ``ratio`` x its mean
    and divided by that ceiling; zero everywhere for a map that is zero everywhere. The edit
    region is where it exceeds the threshold (0.5).

    Returns a float32 tensor of ``difference``'s shape.
    """
    ceiling = ratio * float(difference.float().mean())
    if ceiling == 0:
        return torch.zeros_like(difference, dtype=torch.float32)
    return difference.float().clamp(0.0, ceiling) / ceiling


def _check(*, num_inference_steps: int, encode_ratio: float,
           num_masks: int, mask_encode_strength: float, mask_thresholding_ratio: float,
           mask_threshold: float, **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"diffedit: num_inference_steps must be >= 1, got {num_inference_steps}")
    for name, value in (("encode_ratio", encode_ratio),
                        ("mask_encode_strength", mask_encode_strength)):
        if not 0.0 < value <= 1.0 or decode_steps(num_inference_steps, value) < 1:
            raise ValueError(f"diffedit: {name} must be in (0, 1] and leave at least one of the "
                             f"num_inference_steps={num_inference_steps} steps "
                             f"(at least {1 / num_inference_steps:.3g}), got {value}")
    if num_masks < 1:
        raise ValueError(f"diffedit: num_masks must be >= 1, got {num_masks}")
    if mask_thresholding_ratio <= 0:
        raise ValueError("diffedit: mask_thresholding_ratio must be > 0, got "
                         f"{mask_thresholding_ratio}")
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"diffedit: mask_threshold must be in [0, 1), got {mask_threshold}")


@register_method(CARD, check=_check)
def diffedit(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
             num_inference_steps: int, guidance_scale: float, encode_ratio: float, num_masks: int,
             mask_encode_strength: float, mask_thresholding_ratio: float,
             mask_threshold: float) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (module docstring)."""
    unet = pipe.unet
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    latents = encode_image(pipe, inputs.image).to(unet.dtype)
    source = encode_prompt(pipe, inputs.source_prompt)
    target = encode_prompt(pipe, inputs.target_prompt)
    empty = encode_prompt(pipe, "")

    # 1. the mask, from n draws at the timestep of mask_encode_strength
    mask_timestep = scheduler.timesteps[
        num_inference_steps - decode_steps(num_inference_steps, mask_encode_strength)]
    noise = torch.randn((num_masks, *latents.shape[1:]), generator=generator)
    difference = rescale_map(noise_difference_map(unet, scheduler, latents, source, target,
                                                  noise, mask_timestep), mask_thresholding_ratio)
    region = (difference > mask_threshold).float()

    # 2. DDIM encoding under the empty prompt to floor(steps x encode_ratio) steps
    steps = decode_steps(num_inference_steps, encode_ratio)
    key = inversion_key(kind="ddim", image=inputs.image, prompt="", pipe=pipe,
                        scheduler=scheduler, num_inference_steps=num_inference_steps,
                        guidance_scale=1.0, options={"inverted_steps": steps})
    encoded, cached = cached_inversion(
        inputs.inversion_cache, key,
        lambda: {"trajectory": ddim_invert(unet, latents, scheduler, empty, num_steps=steps)})
    trajectory = [z.to(unet.device, unet.dtype) for z in encoded["trajectory"]]

    # 3. masked decoding: outside the mask, the encoding's latent of the level reached
    mask = region[None, None].to(unet.device, unet.dtype)
    timesteps, alphas = noise_levels(scheduler)
    z = trajectory[steps]
    for level in range(steps, 0, -1):
        eps = predict_noise(unet, scheduler, z, timesteps[level - 1], target, empty,
                            guidance_scale)
        z = ddim_step(z, eps, alphas[level], alphas[level - 1])
        z = mask * z + (1 - mask) * trajectory[level - 1]
    return MethodOutput(decode_latents(pipe, z), {
        "inversion_cached": cached, "edit_region": region, "difference_map": difference,
        "edit_fraction": float(region.mean()), "encoded_steps": steps})
