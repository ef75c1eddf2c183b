"""DiffusionDisentanglement: per-step mixing weights between the neutral and the attribute text
embeddings, optimised for the edit while keeping the content.

Paper: "Uncovering the Disentanglement Capability in Text-to-Image Diffusion Models", Wu, Liu,
Zhao, Kale, Bui, Yu, Lin, Zhang and Chang, CVPR 2023, arXiv:2212.08698 (official code:
UCSB-NLP-Chang/DiffusionDisentanglement, ``scripts/edit.py`` and
``ldm/models/diffusion/plms.py``, its real-image editing path). The survey files it under
test-time finetuning, embeddings finetuning: only S mixing weights are fitted, the model is not.

Algorithm (the official real-image path; e_n: the source prompt's embedding, the "neutral" one;
e_a: the target prompt's, the "attribute" one; S = ``num_inference_steps``):

1. Inversion: DDIM inversion of the source latent under e_n with classifier-free guidance
   ``guidance_scale`` (7.5, the empty prompt as the unconditional one) gives the start x_T
   (cached like any inversion).
2. Anchors: for each of the first S - ``free_steps`` sampling steps (33 of 50: the official code
   adds its noise while the step index is above 16), a noised source q_i = sqrt(a) z_0 +
   sqrt(1 - a) eps_i at the level the step lands on (eps_i from the edit's generator), and the
   neutral step's output m_i: sampling under e_n from x_T, each of these steps lands on q_i; the
   last ``free_steps`` steps are plain DDIM. Its result is the **neutral generation**.
3. Mixed sampling: at step i the denoiser is conditioned on (1 - lambda_i) e_n + lambda_i e_a;
   each of the first S - ``free_steps`` steps lands on q_i + (its DDIM output - m_i) (the
   official code's added noise q_i - m_i), the rest are plain DDIM. With every lambda_i = 0 this
   is the neutral generation, bit for bit.
4. Fit: lambda (S weights, unconstrained) starts at ``lambda_early`` for the first
   ``lambda_t_star`` steps and ``lambda_late`` after (the official defaults: 0 for 20 steps, then
   1; the official code weights e_n, we weight e_a: its w is our 1 - lambda), then
   ``optimisation_steps`` (10) Adam steps of ``learning_rate`` (0.05) on
   ``L = L_dir + perceptual_weight * L_perc`` (weight 0.05) of the decoded mixed sample x against
   the decoded neutral generation x_n, with gradients through the whole sampling chain and the
   VAE decoder: L_dir = 1 - cos(E_I(x) - E_I(x_n), E_T(target) - E_T(source)) with CLIP
   ViT-B/32's embeddings (not normalised first, as the official code), L_perc the L1 distance of
   VGG-16 features at relu1_2, 2_2, 3_3 and 4_3 at 224 px
   (:mod:`editeval.models.image_losses`; ``perceptual_weight`` 0 leaves it out).
5. The edit: mixed sampling (3) with the fitted weights.

Steps 2 and 4 are kept in the run's cache (:func:`~editeval.diffusion.finetuning.
finetuned_state`), keyed by the image, both prompts and every setting, so the same edit again
costs the final sampling only.

Deviations: DDIM sampling (official: PLMS, whose first step costs two evaluations); each anchor
sits at the level its step lands on (official: at the level of the step's own timestep, one step
noisier); the CLIP input is the image resized bilinearly to the CLIP's size and normalised with
its processor's mean and std (official: upsampled x7, average-pooled by 16, 512 -> 224 px, not
normalised); the reference is the float decoded neutral generation (official: its 8-bit PNG); the
edit is sampled with the weights after the last update (official: the image of the last loss
evaluation, before its update, i.e. after optimisation_steps - 1 updates); the fit runs on a
float32 copy of the denoiser and VAE whatever the pipeline's dtype; ``gradient_checkpointing``
(off, as the official code) recomputes the denoiser's blocks in the backward pass to save memory
(same numbers, more time). ``clip_model`` and ``perceptual_net`` "auto" are ViT-B/32 and the
ImageNet VGG-16 on real models and, offline, the toy CLIP and a random-weight VGG-16 stand-in on
the toy and tiny models.

NFE (with guidance; halve every term at guidance_scale 1) = 2 S (inversion; 0 when cached)
+ 2 S (neutral generation) + 2 S * optimisation_steps (one sampling chain a step) + 2 S (the
edit); the middle two are 0 when the fit is cached. Backward passes through the denoiser:
S * optimisation_steps (one per denoiser call of each chain; 0 when cached).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.progress import step_progress
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    ddim_invert,
    ddim_scheduler,
    ddim_step,
    noise_level_terms,
    predict_noise,
)
from editeval.diffusion.ddpm import Level, step_levels
from editeval.diffusion.finetuning import finetuned_state, trainable_copy
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.models.image_losses import (
    CLIP_VIT_B32,
    VGG_NETS,
    load_clip_guide,
    load_vgg_perceptual,
    offline_suite,
)

CARD = MethodCard(
    name="diffusion-disentanglement",
    title="DiffusionDisentanglement",
    paper=Paper("Uncovering the Disentanglement Capability in Text-to-Image Diffusion Models",
                "CVPR", 2023, "2212.08698"),
    strategy="test-time-finetuning",
    subcategory="embeddings-finetuning",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "optimisation_steps": 10,
              "learning_rate": 0.05, "perceptual_weight": 0.05, "lambda_t_star": 20,
              "lambda_early": 0.0, "lambda_late": 1.0, "free_steps": 17, "clip_model": "auto",
              "perceptual_net": "auto", "gradient_checkpointing": False},
    nfe_formula="2 * num_inference_steps * (optimisation_steps + 3): inversion, neutral "
                "generation, one chain per optimisation step, the edit (x1 at guidance_scale 1; "
                "the inversion 0 when cached, the neutral generation and the chains 0 when the "
                "fit is cached)",
    backward_formula="num_inference_steps * optimisation_steps (0 when the fit is cached)",
    deviations="DDIM instead of PLMS; anchors at the level each step lands on (official: one "
               "step noisier); CLIP input resized and normalised (official: pooled, not "
               "normalised); the edit after the last update (official: before it); fit in "
               "float32; offline stand-ins (toy CLIP, random VGG-16) on the toy and tiny models",
    note="lambda_i weights the target prompt's embedding at sampling step i (the official code's "
         "w = 1 - lambda weights the source's); 0 everywhere gives the neutral generation. The "
         "fit (anchors, neutral generation, weights) is cached per image, both prompts and all "
         "settings. clip_model/perceptual_net 'auto': ViT-B/32 and ImageNet VGG-16 on real "
         "models (downloads), toy CLIP and random VGG-16 on toy/tiny.",
)


def _check(*, num_inference_steps: int, guidance_scale: float, optimisation_steps: int,
           learning_rate: float, perceptual_weight: float, lambda_t_star: int,
           lambda_early: float, lambda_late: float, free_steps: int, clip_model: str,
           perceptual_net: str, gradient_checkpointing: bool) -> None:
    name = CARD.name
    if num_inference_steps < 1:
        raise ValueError(f"{name}: num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"{name}: guidance_scale must be >= 0, got {guidance_scale}")
    if optimisation_steps < 0:
        raise ValueError(f"{name}: optimisation_steps must be >= 0, got {optimisation_steps}")
    if learning_rate < 0 or perceptual_weight < 0:
        raise ValueError(f"{name}: learning_rate and perceptual_weight must be >= 0, got "
                         f"{learning_rate} and {perceptual_weight}")
    for option, value in (("lambda_t_star", lambda_t_star), ("free_steps", free_steps)):
        if not 0 <= value <= num_inference_steps:
            raise ValueError(f"{name}: {option} must be in [0, num_inference_steps = "
                             f"{num_inference_steps}], got {value} (scale it with the steps: "
                             f"the defaults are for 50)")
    if not clip_model.strip():
        raise ValueError(f"{name}: clip_model must be 'auto', 'toy', a hub id or a folder")
    if perceptual_net not in ("auto", *VGG_NETS):
        raise ValueError(f"{name}: perceptual_net must be one of auto, {', '.join(VGG_NETS)}; "
                         f"got {perceptual_net!r}")


Anchor = tuple[torch.Tensor, torch.Tensor]
"""``(q_i, m_i)``: the noised source a corrected step lands on and the neutral step's output."""


def _step(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, level: Level,
          text: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """One guided DDIM step (2 NFE with guidance, 1 without)."""
    timestep, alpha_t, alpha_prev = level
    noise = predict_noise(unet, scheduler, latents, timestep, text, uncond, guidance_scale)
    return ddim_step(latents, noise, alpha_t, alpha_prev)


@dataclass
class MixingChain:
    """The sampling chain of one edit: the denoiser, its DDIM scheduler (set to S steps), the
    start x_T (1, 4, h, w), the neutral, attribute and unconditional embeddings (1, 77, D) and
    the guidance scale; float32 throughout."""

    unet: torch.nn.Module
    scheduler: Any
    start: torch.Tensor
    neutral: torch.Tensor
    attribute: torch.Tensor
    uncond: torch.Tensor
    guidance_scale: float

    @torch.no_grad()
    def neutral_generation(self, targets: Sequence[torch.Tensor]) -> tuple[list[Anchor],
                                                                           torch.Tensor]:
        """Sample under the neutral embedding, landing step i on ``targets[i]`` for the first
        ``len(targets)`` steps (step 2 of the module docstring): the anchors ``(targets[i],
        m_i)`` and the clean latents. NFE = S (x2 with guidance)."""
        anchors, latents = [], self.start
        for i, level in enumerate(step_levels(self.scheduler)):
            output = _step(self.unet, self.scheduler, latents, level, self.neutral, self.uncond,
                           self.guidance_scale)
            if i < len(targets):
                anchors.append((targets[i], output))
                latents = targets[i]
            else:
                latents = output
        return anchors, latents

    def sample(self, anchors: Sequence[Anchor], weights: torch.Tensor) -> torch.Tensor:
        """Sample with the denoiser at step i conditioned on ``(1 - weights[i]) * neutral +
        weights[i] * attribute``, each anchored step landing on ``q_i + (output - m_i)`` (step 3
        of the module docstring); differentiable in ``weights`` (S floats). The clean latents;
        NFE = S (x2 with guidance)."""
        latents = self.start
        for i, level in enumerate(step_levels(self.scheduler)):
            text = (1 - weights[i]) * self.neutral + weights[i] * self.attribute
            output = _step(self.unet, self.scheduler, latents, level, text, self.uncond,
                           self.guidance_scale)
            latents = anchors[i][0] + (output - anchors[i][1]) if i < len(anchors) else output
        return latents


def _pixels(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decoded images (1, 3, H, W) in [0, 1], differentiable."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images + 1) / 2).clamp(0, 1)


def _inverted_start(pipe: Any, inputs: EditInputs, scheduler: Any, steps: int,
                    guidance_scale: float) -> tuple[torch.Tensor, bool]:
    """x_T: the guided DDIM inversion under the source prompt (cached, kind ``ddim``)."""
    key = inversion_key(kind="ddim", image=inputs.image, prompt=inputs.source_prompt, pipe=pipe,
                        scheduler=scheduler, num_inference_steps=steps,
                        guidance_scale=guidance_scale)

    def compute() -> dict:
        latents = encode_image(pipe, inputs.image).to(pipe.unet.dtype)
        return {"trajectory": ddim_invert(pipe.unet, latents, scheduler,
                                          encode_prompt(pipe, inputs.source_prompt),
                                          encode_prompt(pipe, ""), guidance_scale)}

    value, hit = cached_inversion(inputs.inversion_cache, key, compute)
    return value["trajectory"][-1], hit


def _adam(objective: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor, steps: int,
          learning_rate: float) -> tuple[torch.Tensor, list[float]]:
    """``steps`` Adam steps on a copy of ``initial`` minimising ``objective``: the result
    (detached) and the loss of every step, before its update; progress shown."""
    weights = initial.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weights], lr=learning_rate)
    losses: list[float] = []
    with torch.enable_grad(), step_progress(f"{CARD.name}: mixing weights", steps) as update:
        for _ in range(steps):
            loss = objective(weights)
            (weights.grad,) = torch.autograd.grad(loss, [weights])
            optimiser.step()
            losses.append(float(loss.detach()))
            update(loss=losses[-1])
    return weights.detach(), losses


@register_method(CARD, check=_check)
def diffusion_disentanglement(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                              num_inference_steps: int, guidance_scale: float,
                              optimisation_steps: int, learning_rate: float,
                              perceptual_weight: float, lambda_t_star: int, lambda_early: float,
                              lambda_late: float, free_steps: int, clip_model: str,
                              perceptual_net: str,
                              gradient_checkpointing: bool) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    steps = num_inference_steps
    offline = offline_suite(pipe) is not None
    clip_name = ("toy" if offline else CLIP_VIT_B32) if clip_model == "auto" else clip_model
    vgg_name = ("vgg16-random" if offline else "vgg16") if perceptual_net == "auto" \
        else perceptual_net
    scheduler = ddim_scheduler(pipe, steps)
    device = pipe.unet.device
    start, inversion_cached = _inverted_start(pipe, inputs, scheduler, steps, guidance_scale)
    texts = [encode_prompt(pipe, p).float() for p in (inputs.source_prompt, inputs.target_prompt,
                                                       "")]
    initial = torch.tensor([lambda_early] * lambda_t_star + [lambda_late] * (steps - lambda_t_star),
                           dtype=torch.float32, device=device)
    with trainable_copy(pipe) as unet:
        chain = MixingChain(unet, scheduler, start.to(device, torch.float32), *texts,
                            guidance_scale)

        def fit() -> dict[str, Any]:
            source = encode_image(pipe, inputs.image).float()
            targets = []
            for _, _, alpha in step_levels(scheduler)[:steps - free_steps]:
                noise = torch.randn(source.shape, generator=generator).to(device)
                sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha, source)
                targets.append(sqrt_alpha * source + sqrt_one_minus * noise)
            anchors, reference = chain.neutral_generation(targets)
            weights, losses = initial, []
            if optimisation_steps > 0:
                clip = load_clip_guide(clip_name, str(device))
                vgg = load_vgg_perceptual(vgg_name, str(device)) if perceptual_weight else None
                vae = copy.deepcopy(pipe.vae).requires_grad_(False)
                torch.nn.Module.to(vae, torch.float32)  # a plain cast: diffusers' warns
                if gradient_checkpointing:
                    unet.enable_gradient_checkpointing()
                with torch.no_grad():
                    original = _pixels(vae, reference)
                prompts = clip.text_features([inputs.source_prompt, inputs.target_prompt])

                def objective(mixing: torch.Tensor) -> torch.Tensor:
                    edited = _pixels(vae, chain.sample(anchors, mixing))
                    loss = clip.directional_loss(original, edited, prompts[:1], prompts[1:])
                    return loss if vgg is None else loss + perceptual_weight * vgg(edited, original)

                weights, losses = _adam(objective, initial, optimisation_steps, learning_rate)
            return {"targets": [q for q, _ in anchors], "outputs": [m for _, m in anchors],
                    "reference": reference, "weights": weights, "losses": losses}

        settings = {"target_prompt": inputs.target_prompt, "num_inference_steps": steps,
                    "guidance_scale": guidance_scale, "optimisation_steps": optimisation_steps,
                    "learning_rate": learning_rate, "perceptual_weight": perceptual_weight,
                    "lambda_t_star": lambda_t_star, "lambda_early": lambda_early,
                    "lambda_late": lambda_late, "free_steps": free_steps, "clip_model": clip_name,
                    "perceptual_net": vgg_name}
        state, cached = finetuned_state(inputs.inversion_cache, kind=CARD.name, pipe=pipe,
                                        image=inputs.image, prompt=inputs.source_prompt,
                                        settings=settings, generator=generator, compute=fit)
        anchors = [(q.to(device), m.to(device)) for q, m in zip(state["targets"],
                                                               state["outputs"])]
        weights = state["weights"].to(device)
        with torch.no_grad():
            latents = chain.sample(anchors, weights)
    return MethodOutput(decode_latents(pipe, latents), {
        "inversion_cached": inversion_cached,
        "fit_cached": cached,
        "optimisation_steps": optimisation_steps,
        "mixing_weights": [float(w) for w in weights],
        "losses": list(state["losses"]),
        "neutral_generation": decode_latents(pipe, state["reference"].to(device)),
    })
