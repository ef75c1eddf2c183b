"""Test-time finetuning: the parts shared by the methods that fit a text embedding or the
denoiser's weights to the one image they edit (Imagic, SINE, Forgedit, ...).

- :func:`trainable_copy`: the pipeline's denoiser copied in float32 (optimisation in half
  precision diverges), counted by the running edit's NFE counter. The shared pipeline is never
  changed, also when the edit raises half-way: every weight a method fits lives in the copy.
- :func:`denoising_loss`: the diffusion training loss at the one image (a random timestep, a
  random noise, the mean squared error between the denoiser's output and its target).
- :func:`fit_denoising_loss`: Adam steps on the given tensors (text embeddings, the copy's
  weights) to minimise that loss, with progress (steps and loss) shown by ``editeval edit``.
- :func:`finetuned_state`: a fitted result (weights, embeddings) kept in the run's cache
  (:class:`~editeval.diffusion.inversion_cache.InversionCache`, as a large entry: bounded in
  memory and on disk), keyed by the image, the prompt, the pretrained weights' digest, the
  settings and the generator's state, so a second edit of the same image (another Imagic eta)
  skips the fitting.

Cost: every forward pass of the copy counts in the edit's NFE, every gradient step through it
as one backward pass (:class:`~editeval.core.nfe.NFECounter`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from editeval.core.nfe import count_also, denoiser
from editeval.core.progress import step_progress
from editeval.diffusion.ddim import noise_level_terms
from editeval.diffusion.inversion_cache import (
    InversionCache,
    Value,
    cached_inversion,
    generator_digest,
    inversion_key,
)


@contextmanager
def trainable_copy(pipe: Any) -> Iterator[torch.nn.Module]:
    """A float32 copy of the pipeline's denoiser on its device, all parameters frozen
    (``requires_grad`` False: :func:`fit_denoising_loss` unfreezes what it fits), in eval mode.

    Inside the block the running edit's NFE counter counts the copy's forward and backward
    passes (:func:`~editeval.core.nfe.count_also`). The copy is the caller's to change and is
    dropped on leaving; the pipeline's own denoiser is not touched.
    """
    original = denoiser(pipe)
    model = copy.deepcopy(original)
    for hooks in (model._forward_pre_hooks, model._forward_hooks,
                  model._forward_pre_hooks_with_kwargs, model._forward_hooks_with_kwargs):
        hooks.clear()  # the original's NFE hooks would count into a copied counter
    torch.nn.Module.to(model, torch.float32)  # a plain cast: diffusers' ``to`` warns on dtype
    model.requires_grad_(False).eval()
    with count_also(model):
        yield model


def denoising_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                     timestep: int | torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to output at ``latents`` noised to ``timestep`` with ``noise``:
    the noise (``epsilon``), the velocity ``sqrt(a) * noise - sqrt(1 - a) * latents``
    (``v_prediction``), or the latents (``sample``), as the scheduler's ``prediction_type`` says.
    ``timestep`` is one for the batch, or one a sample (a (batch,) tensor).

    Raises:
        ValueError: another prediction type.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    if kind == "v_prediction":
        sqrt_alpha, sqrt_one_minus = _noise_levels(scheduler, timestep, noise)
        return sqrt_alpha * noise - sqrt_one_minus * latents
    raise ValueError(f"cannot fit a denoiser with prediction_type {kind!r}: editeval handles "
                     "epsilon, v_prediction and sample")


def _noise_levels(scheduler: Any, timestep: int | torch.Tensor,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (sqrt(a), sqrt(1 - a)) at one timestep, or one a sample shaped to broadcast over a batch
    alpha = scheduler.alphas_cumprod[timestep]
    return tuple(term.reshape(-1, *[1] * (like.dim() - 1)) if term.dim() else term
                 for term in noise_level_terms(alpha, like))


def denoising_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor,
                   text: torch.Tensor, generator: torch.Generator,
                   batch_size: int = 1) -> torch.Tensor:
    """The diffusion training loss at ``latents``: for each of ``batch_size`` copies of the
    image, a timestep drawn uniformly from the training schedule's [0, T) and a standard normal
    noise (all from ``generator``); the mean squared error between ``unet``'s output at the
    noised latents and :func:`denoising_target`, averaged over the batch.

    Args:
        unet: the denoiser (one forward pass of batch ``batch_size``: that many NFE).
        latents: the clean image latents, (1, 4, h, w); used in float32.
        text: the text embedding (1, 77, D) the denoiser is conditioned on.
        batch_size: copies of the image a step (>= 1; Forgedit fits on 10).
    Returns:
        A 0-dim float32 tensor with the graph to whatever requires gradients.
    """
    steps = int(scheduler.config.num_train_timesteps)
    timesteps = torch.randint(0, steps, (batch_size,), generator=generator)
    latents = latents.float()
    noise = torch.randn((batch_size, *latents.shape[1:]),
                        generator=generator).to(latents.device)
    sqrt_alpha, sqrt_one_minus = _noise_levels(scheduler, timesteps, noise)
    noisy = sqrt_alpha * latents + sqrt_one_minus * noise
    dtype = unet.dtype
    output = unet(noisy.to(dtype), timesteps.to(latents.device),
                  encoder_hidden_states=text.to(dtype).expand(batch_size, -1, -1)).sample
    return torch.nn.functional.mse_loss(output.float(),
                                        denoising_target(scheduler, latents, noise, timesteps))


def fit_denoising_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor,
                       text: torch.Tensor | Callable[[], torch.Tensor],
                       groups: Sequence[Mapping[str, Any]], steps: int,
                       generator: torch.Generator, description: str,
                       batch_size: int = 1) -> list[float]:
    """Minimise :func:`denoising_loss` by ``steps`` Adam steps on the tensors of ``groups``.

    Args:
        unet: the denoiser the loss evaluates (a :func:`trainable_copy` when its weights are
            fitted; the tensors fitted must be float32).
        text: the text embedding (1, 77, D), or a function giving it (when it is built from the
            fitted tensors, as Forgedit's).
        groups: Adam parameter groups, ``{"params": [tensors], "lr": rate}``: what is fitted and
            how fast. Their ``requires_grad`` is set for the fit and restored after; only they
            gather gradients.
        steps: number of steps (>= 0); each is one forward and one backward pass
            (``batch_size`` NFE, 1 backward pass).
        generator: draws every step's timesteps and noises.
        description: what the progress display calls the task.
        batch_size: copies of the image a step, each with its own timestep and noise
            (:func:`denoising_loss`).
    Returns:
        The loss of every step, before the step (floats).
    """
    tensors = [tensor for group in groups for tensor in group["params"]]
    flags = [tensor.requires_grad for tensor in tensors]
    for tensor in tensors:
        tensor.requires_grad_(True)
    optimiser = torch.optim.Adam([dict(group) for group in groups])
    losses: list[float] = []
    try:
        with torch.enable_grad(), step_progress(description, steps) as update:
            for _ in range(steps):
                embedding = text() if callable(text) else text
                loss = denoising_loss(unet, scheduler, latents, embedding, generator,
                                      batch_size)
                for tensor, grad in zip(tensors, torch.autograd.grad(loss, tensors,
                                                                     allow_unused=True)):
                    tensor.grad = grad
                optimiser.step()
                losses.append(float(loss.detach()))
                update(loss=losses[-1])
    finally:
        for tensor, flag in zip(tensors, flags):
            tensor.requires_grad_(flag)
            tensor.grad = None
    return losses


def finetuned_state(cache: InversionCache | None, *, kind: str, pipe: Any, image: Image.Image,
                    prompt: str, settings: Mapping[str, Any], generator: torch.Generator,
                    compute: Callable[[], Value]) -> tuple[Value, bool]:
    """``compute()``'s fitted state (a dict of tensors: weights, embeddings), or the one the run's
    cache keeps for the same fit; and whether it was cached.

    The key holds ``kind`` (the method and stage), the image's pixels, the prompt, the
    *pretrained* pipeline's weights digest and configuration, ``settings`` (everything the fit
    depends on: steps, rates, ...) and ``generator``'s state before the fit (it draws the
    timesteps and noise), so any change fits again. Stored as a large entry of ``cache``
    (:meth:`~editeval.diffusion.inversion_cache.InversionCache.get_or_compute`), whose NFE a hit
    adds to the edit's ``saved`` count. The generator is advanced as the fit would have advanced
    it, so what the edit draws next does not depend on the hit: on a hit, the state after the
    fit is restored from the entry.
    """
    key = inversion_key(kind=kind, image=image, prompt=prompt, pipe=pipe, scheduler=pipe.scheduler,
                        num_inference_steps=0, guidance_scale=0.0,
                        options={**settings, "generator": generator_digest(generator)})

    def fit() -> Value:
        value = dict(compute())
        value["generator_state"] = generator.get_state()
        return value

    value, hit = cached_inversion(cache, key, fit, large=True)
    if hit:
        generator.set_state(value["generator_state"])
    return value, hit


def weights_of(model: torch.nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached float32 copies of ``model``'s parameters (those in ``names``, or all), by name:
    what a cache entry keeps of fitted weights (:func:`finetuned_state`)."""
    wanted = None if names is None else set(names)
    return {name: tensor.detach().float().clone() for name, tensor in model.named_parameters()
            if wanted is None or name in wanted}


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (from :func:`weights_of`) into ``model``'s parameters of the same names.

    Raises:
        KeyError: a name ``model`` does not have (a cache entry of another architecture).
    """
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor.to(parameters[name].device))
