"""Latent-variable optimisation: one loop for the methods that edit by optimising the image latent
against a loss built from the denoiser (Delta Denoising Score, Contrastive Denoising Score, ...).

:func:`optimise_latents` runs plain SGD on a float32 copy of the latent, whatever the pipeline's
dtype; a method gives the loss of one iteration. :func:`delta_denoising_score` is the score
difference of DDS (Hertz et al., ICCV 2023, arXiv:2304.07090) such a loss is built on;
:func:`attention_outputs` and :func:`patch_nce_loss` give CDS's contrastive loss on self-attention
features (Nam et al., CVPR 2024, arXiv:2311.18608).

Cost: the loss decides it. A score that is evaluated without a graph (as DDS's) costs its UNet
batch in NFE and no backward pass through the denoiser; a loss that differentiates through the
denoiser (CDS's feature loss) also costs one backward pass a call, which
:class:`~editeval.core.nfe.NFECounter` counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from editeval.core.progress import step_progress
from editeval.diffusion.ddim import model_noise, noise_level_terms

NCE_TEMPERATURE = 0.07
"""PatchNCE's temperature (CUT's and CDS's)."""


@dataclass
class OptimisedLatents:
    """The outcome of :func:`optimise_latents`.

    Attributes:
        latents: the optimised latent, detached, float32, the start's shape.
        losses: the loss of every iteration, in order (floats; the loss's value before the
            step, in the loss's own units).
    """

    latents: torch.Tensor
    losses: list[float]


def optimise_latents(start: torch.Tensor, loss: Callable[[torch.Tensor, int], torch.Tensor],
                     iterations: int, learning_rate: float,
                     description: str = "latent optimisation") -> OptimisedLatents:
    """Minimise ``loss(latents, i)`` over the latent by ``iterations`` SGD steps of size
    ``learning_rate`` from ``start``.

    Args:
        start: the initial latent, any shape and dtype; optimised as a float32 copy (never
            changed itself).
        loss: the 0-dim loss of iteration ``i`` (0-based) at the float32 latent that requires
            gradients; it may evaluate the denoiser with or without a graph.
        iterations: number of steps, >= 0.
        learning_rate: the SGD step size, > 0.
        description: what the progress display (:func:`~editeval.core.progress.step_progress`,
            shown by ``editeval edit``) calls the loop; it shows every step's loss.

    Raises:
        ValueError: ``iterations < 0`` or ``learning_rate <= 0``.
    """
    if iterations < 0 or learning_rate <= 0:
        raise ValueError(f"optimise_latents: iterations must be >= 0 and learning_rate > 0, got "
                         f"{iterations} and {learning_rate}")
    latents = start.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.SGD([latents], lr=learning_rate)
    losses = []
    with torch.enable_grad(), step_progress(description, iterations) as update:
        for i in range(iterations):
            value = loss(latents, i)
            # the gradient of the latent only: the denoiser's weights gather no .grad
            (latents.grad,) = torch.autograd.grad(value, latents)
            optimiser.step()
            losses.append(float(value.detach()))
            update(loss=losses[-1])
    return OptimisedLatents(latents.detach(), losses)


@torch.no_grad()
def delta_denoising_score(unet: torch.nn.Module, scheduler, source: torch.Tensor,
                          target: torch.Tensor, source_text: torch.Tensor,
                          target_text: torch.Tensor, null_text: torch.Tensor, timestep: int,
                          noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """DDS's gradient direction ``eps_w(z_t, target_text, t) - eps_w(zhat_t, source_text, t)``.

    Both latents are noised to ``timestep`` with the same ``noise``; ``eps_w`` is the
    classifier-free-guided noise prediction (scale ``guidance_scale``, unconditional embedding
    ``null_text``). One UNet call on a batch of 4 (4 NFE), without a graph (no backward pass
    through the UNet); the noise conversion of :func:`~editeval.diffusion.ddim.model_noise`
    (v-prediction models work).

    Args:
        unet: the denoiser. scheduler: gives ``alphas_cumprod`` and ``prediction_type``.
        source, target: the source latent ``zhat`` and the optimised latent ``z``, (1, 4, h, w).
        source_text, target_text, null_text: text embeddings, (1, 77, D).
        timestep: an integer timestep of the training schedule, in [0, T).
        noise: the noise, like ``source``.

    Returns:
        The difference, float32, the latents' shape: zero when the latents and texts are equal.
    """
    sqrt_alpha, sqrt_one_minus = noise_level_terms(scheduler.alphas_cumprod[timestep],
                                                   noise.float())
    noisy = [sqrt_alpha * latents.float() + sqrt_one_minus * noise.float()
             for latents in (source, target)]
    dtype = unet.dtype
    batch = torch.cat([noisy[0], noisy[0], noisy[1], noisy[1]]).to(dtype)
    texts = torch.cat([null_text, source_text, null_text, target_text]).to(dtype)
    eps = model_noise(unet, scheduler, batch, timestep, texts).float()
    uncond_s, cond_s, uncond_t, cond_t = eps.chunk(4)
    guided_source = uncond_s + guidance_scale * (cond_s - uncond_s)
    guided_target = uncond_t + guidance_scale * (cond_t - uncond_t)
    return guided_target - guided_source


@contextmanager
def attention_outputs(unet: torch.nn.Module,
                      wanted: Callable[[str], bool]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of every attention module of ``unet`` whose name ``wanted`` accepts
    (the attention's result after its output projection, before the block's residual), with
    its graph: a dict, name -> (B, N, C) of the last call, filled as the UNet runs.

    The forward hooks are removed on leaving the block, also when it raises. Self-attention
    layers of the decoder, as CDS uses: ``lambda name: name.startswith("up_blocks") and
    name.endswith("attn1")``.
    """
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output
        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in unet.named_modules()
               if type(module).__name__ == "Attention" and wanted(name)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def patch_nce_loss(reference: torch.Tensor, current: torch.Tensor, patch_sizes: tuple[int, ...],
                   n_patches: int, generator: torch.Generator) -> torch.Tensor:
    """CDS's contrastive (PatchNCE) loss between two feature maps of one image.

    For each patch size p, both maps are average-pooled over p x p, L2-normalised over channels
    and ``min(n_patches, positions)`` positions are drawn (the same for both, from
    ``generator``); each drawn position of ``current`` should match the same position of
    ``reference`` (positive) against every other drawn one (negatives), cross-entropy over
    similarities / 0.07, averaged over positions; the loss sums over the patch sizes.

    Args:
        reference: (1, N, C) features with N a square (detached here: no gradient reaches it).
        current: (1, N, C), the same layer's features of the edited latent.
    Returns:
        A 0-dim float32 tensor, >= 0.
    """
    positions = reference.shape[1]
    side = round(positions ** 0.5)
    if side * side != positions:
        raise ValueError(f"patch_nce_loss: {positions} positions are not a square feature map")
    maps = [x.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
            for x in (reference.detach(), current)]
    total = torch.zeros((), device=current.device)
    for size in patch_sizes:
        pooled = [torch.nn.functional.avg_pool2d(m, size) if size > 1 else m for m in maps]
        ref, cur = (torch.nn.functional.normalize(m, dim=1).flatten(2)[0].T for m in pooled)
        ids = torch.randperm(ref.shape[0], generator=generator)[:n_patches].to(ref.device)
        ref, cur = ref[ids], cur[ids]
        positive = (ref * cur).sum(dim=1, keepdim=True)  # patch i of current against its own
        negative = (ref @ cur.T).masked_fill(torch.eye(len(ids), dtype=torch.bool,
                                                       device=ref.device), -10.0)
        logits = torch.cat([positive, negative], dim=1) / NCE_TEMPERATURE
        target = torch.zeros(len(ids), dtype=torch.long, device=ref.device)
        total = total + torch.nn.functional.cross_entropy(logits, target)
    return total
