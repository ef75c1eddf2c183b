"""DDIM inversion and reconstruction on the tiny model."""

from __future__ import annotations

import pytest
import torch

from editeval.core import count_nfe
from editeval.data import fit_to_resolution, load_image
from editeval.diffusion.ddim import ddim_invert, ddim_scheduler, ddim_step, reconstruct
from editeval.diffusion.latents import encode_image, encode_prompt


@pytest.fixture(scope="module")
def image(shared):
    return fit_to_resolution(load_image(shared / "action_change" / "1.jpeg"), 64)[0]


def test_ddim_step_is_its_own_inverse_for_a_fixed_noise():
    x = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    a, b = torch.tensor(0.9), torch.tensor(0.3)
    assert torch.allclose(ddim_step(ddim_step(x, eps, a, b), eps, b, a), x, atol=1e-5)


def test_reconstruction_error_falls_with_steps(tiny_sd, image):
    errors = [reconstruct(tiny_sd, image, "a man running", steps).latent_error
              for steps in (10, 25, 50)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.15  # stated bound: relative latent L2 error at 50 steps


def test_inversion_costs_one_nfe_per_step_and_ends_at_the_noisiest_timestep(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 20)
    latents = encode_image(tiny_sd, image)
    with count_nfe(tiny_sd.unet) as counter:
        trajectory = ddim_invert(tiny_sd.unet, latents, scheduler, encode_prompt(tiny_sd, ""))
    assert counter.nfe == 20 and len(trajectory) == 21
    assert scheduler.timesteps[0] == 951 and scheduler.timesteps[-1] == 1  # SD's leading spacing
    assert trajectory[-1].std() > latents.std() * 0.5  # it moved towards noise
