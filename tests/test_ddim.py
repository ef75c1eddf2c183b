"""DDIM inversion and reconstruction on the tiny model; the denoiser's parameterisation (epsilon,
v, x0); the schedule's precision in float16."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from editeval.core import EditRequest, count_nfe, get_method
from editeval.data import fit_to_resolution, load_image
from editeval.diffusion.ddim import (
    ddim_invert,
    ddim_sample,
    ddim_scheduler,
    ddim_step,
    predicted_noise,
    reconstruct,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.editing import edit
from editeval.models import load_pipeline
from editeval.models.tiny import tiny_checkpoint


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


# --- the denoiser's parameterisation (scheduler.config.prediction_type) ---------------------------

def test_model_outputs_convert_to_noise_by_hand():
    # a = 0.36: x = 0.6 x0 + 0.8 eps; v = 0.6 eps - 0.8 x0
    x0, eps = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    x, v = 0.6 * x0 + 0.8 * eps, 0.6 * eps - 0.8 * x0
    alpha = torch.tensor(0.36)
    assert torch.allclose(predicted_noise(eps, x, alpha, "epsilon"), eps)
    assert torch.allclose(predicted_noise(v, x, alpha, "v_prediction"), eps, atol=1e-6)
    assert torch.allclose(predicted_noise(x0, x, alpha, "sample"), eps, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'; editeval supports"):
        predicted_noise(eps, x, alpha, "flow_prediction")


def reparameterised(pipe, prediction_type: str):
    """``pipe`` (fresh: its UNet gets a hook) turned into the tiny epsilon model's denoiser written
    in ``prediction_type``: its scheduler reads the output as v (or x0), and a forward hook turns
    the UNet's noise prediction into exactly that. Correct samplers then give the epsilon model's
    results; one that read v as noise would not."""
    from diffusers import PNDMScheduler
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    if pipe.scheduler.config.prediction_type != prediction_type:
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config,
                                                   prediction_type=prediction_type)
    alphas = pipe.scheduler.alphas_cumprod.double()

    def hook(module, args, kwargs, output):
        x = (args[0] if args else kwargs["sample"]).double()
        alpha = alphas[int(args[1] if len(args) > 1 else kwargs["timestep"])]
        eps = output[0] if isinstance(output, tuple) else output.sample  # return_dict=False
        x0 = (x - (1 - alpha).sqrt() * eps.double()) / alpha.sqrt()
        value = alpha.sqrt() * eps.double() - (1 - alpha).sqrt() * x0 \
            if prediction_type == "v_prediction" else x0
        value = value.to(eps.dtype)
        return (value,) if isinstance(output, tuple) else UNet2DConditionOutput(sample=value)

    pipe.unet.register_forward_hook(hook, with_kwargs=True)
    return pipe


@pytest.fixture(scope="module")
def same_denoiser():
    """The tiny epsilon model's denoiser written as a v predictor (on the tiny v checkpoint, loaded
    as a user's: same weights, scheduler ``prediction_type`` v_prediction) and as an x0 one."""
    return {"v_prediction": reparameterised(load_pipeline(str(tiny_checkpoint("sd-v"))),
                                            "v_prediction"),
            "sample": reparameterised(load_pipeline("tiny"), "sample")}


def _psnr(image, reference) -> float:
    a, b = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_a_v_or_x0_prediction_model_reconstructs_as_well_as_an_epsilon_one(
        tiny_sd, same_denoiser, image, prediction_type):
    pipe = same_denoiser[prediction_type]
    assert pipe.scheduler.config.prediction_type == prediction_type
    vae_only = decode_latents(tiny_sd, encode_image(tiny_sd, image))
    eps = reconstruct(tiny_sd, image, "a man running", 20)
    other = reconstruct(pipe, image, "a man running", 20)
    # measured: 19.03 dB both (the epsilon model's DDIM reconstruction against its VAE round trip;
    # reading v as noise gives 14.06 dB and a latent error of 1e4 instead of 0.19)
    assert _psnr(other.image, vae_only) == pytest.approx(_psnr(eps.image, vae_only), abs=0.05)
    assert torch.allclose(other.inverted, eps.inverted, atol=1e-4)
    assert other.latent_error == pytest.approx(eps.latent_error, abs=1e-4)


def test_the_tiny_v_checkpoint_reads_its_output_as_v(image):
    # the same weights read as v: another denoiser, which reconstructs too (measured 28.2 dB
    # against the VAE round trip at 20 steps; 19.0 dB when its v is read as noise)
    pipe = load_pipeline(str(tiny_checkpoint("sd-v")))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    vae_only = decode_latents(pipe, encode_image(pipe, image))
    assert _psnr(reconstruct(pipe, image, "a man running", 20).image, vae_only) > 25


# --- schedule precision in float16 --------------------------------------------------------------

class ConstantNoise:
    """A denoiser predicting eps = 1 everywhere, in the latents' dtype: from zero latents, a step's
    output is its schedule coefficient, computed by hand in float32 below."""

    def __call__(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=torch.ones_like(sample))


def _one_step_scheduler():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", set_alpha_to_one=False,
                              steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(1)  # timestep 1 -> the clean level 0.99915: 1 - a is tiny at both
    return scheduler


def _samplers():
    from editeval.diffusion.dual_branch import BranchGuidance, sample_branches
    from editeval.diffusion.source_branch import denoise_with_source_branch
    from editeval.methods.training_free.ddpm_inversion import ddpm_invert, ddpm_sample

    unet, text = ConstantNoise(), torch.zeros(1, 77, 8)
    return {
        "ddim_invert": lambda s, z: ddim_invert(unet, z, s, text)[-1],
        "ddim_sample": lambda s, z: ddim_sample(unet, z, s, text),
        "sample_branches": lambda s, z: sample_branches(
            unet, z, s, torch.cat([text, text]), BranchGuidance(text, 7.5)),
        "denoise_with_source_branch": lambda s, z: torch.cat(denoise_with_source_branch(
            unet, s, z, text, text, text, 7.5)),
        "ddpm_invert": lambda s, z: torch.cat(  # the noisy latents (the noise maps divide by
            # a tiny sigma: float16 rounding of the latents alone moves them by 0.1 %)
            ddpm_invert(unet, z, s, text, generator=torch.Generator().manual_seed(0))[0]),
        "ddpm_sample": lambda s, z: ddpm_sample(unet, z, [torch.ones_like(z)], s, text),
    }


@pytest.mark.parametrize("sampler", list(_samplers()))
def test_float16_steps_use_the_float32_schedule(sampler):
    run = _samplers()[sampler]
    scheduler = _one_step_scheduler()
    exact = run(scheduler, torch.zeros(1, 4, 2, 2))
    half = run(scheduler, torch.zeros(1, 4, 2, 2, dtype=torch.float16))
    assert half.dtype == torch.float16
    # float16 rounding of the result only; alpha-bar cast to float16 first is off by 4-7 %
    assert torch.allclose(half.float(), exact, rtol=2e-3, atol=1e-4), \
        f"{sampler}: {half.float().flatten()[:4]} vs {exact.flatten()[:4]}"


def test_noise_level_terms_in_float16_are_the_float32_ones_rounded():
    from editeval.diffusion.ddim import noise_level_terms

    scheduler = _one_step_scheduler()
    for alpha in (scheduler.final_alpha_cumprod, scheduler.alphas_cumprod[1],
                  scheduler.alphas_cumprod[999]):
        half = noise_level_terms(alpha, torch.zeros(1, dtype=torch.float16))
        exact = (alpha.sqrt(), (1 - alpha).sqrt())
        assert all(h.dtype == torch.float16 for h in half)
        assert [h.item() for h in half] == [e.half().item() for e in exact]


FAST = {
    "p2p": {"num_inference_steps": 4},
    "null-text": {"num_inference_steps": 4, "null_text_inner_steps": 2},
    "negative-prompt-inversion": {"num_inference_steps": 4},
    "proxedit": {"num_inference_steps": 4},
    "direct-inversion": {"num_inference_steps": 4},
    "pnp": {"num_inference_steps": 4, "inversion_steps": 4},
    "masactrl": {"num_inference_steps": 4, "start_step": 1},
    "ddpm-inversion": {"num_inference_steps": 6, "skip": 2},
    "edict": {"num_inference_steps": 5},
    "aidi": {"num_inference_steps": 4, "num_fixed_point_iterations": 2},
    "sdedit": {"num_inference_steps": 6},
}


@pytest.mark.parametrize("method", list(FAST))
def test_every_method_edits_alike_whatever_the_parameterisation(tiny_sd, same_denoiser, image,
                                                                method):
    source = "a man running" if "source_prompt" in get_method(method).card.inputs else ""
    request = EditRequest(image, source_prompt=source, target_prompt="a woman running",
                          params=FAST[method])
    reference = np.asarray(edit(request, method, pipe=tiny_sd).model_image, dtype=np.int16)
    edited = np.asarray(edit(request, method, pipe=same_denoiser["v_prediction"]).model_image,
                        dtype=np.int16)
    # the same denoiser: the same pixels up to rounding (measured: reading v as noise gives
    # 13-15 dB against the epsilon model's edit, pixels off by up to 255; sdedit runs diffusers'
    # own sampler, which reads prediction_type itself)
    assert np.abs(edited - reference).max() <= 2
