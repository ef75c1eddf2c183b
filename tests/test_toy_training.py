"""The toy models' training loop: checkpoints record the architecture, resume exactly, and the
VAE's loss weights object pixels."""

from __future__ import annotations

import pytest
import torch

from editeval.toyworld.training import (
    OBJECT_WEIGHT,
    Checkpointed,
    _reconstruction_loss,
    instruction_unet_from,
    load_weights,
    new_unet,
)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=2)


def _loss(model):
    weight = model.decoder.conv_out.weight
    return lambda rng: (weight.sum() - float(rng.normal())) ** 2


def test_a_killed_training_run_resumes_to_the_same_weights(tmp_path):
    straight = Checkpointed(tmp_path / "straight.ckpt", _tiny_vae, lr=1e-2, seed=3)
    straight.train(8, _loss(straight.model), every_seconds=1e9, desc="straight")

    killed = Checkpointed(tmp_path / "killed.ckpt", _tiny_vae, lr=1e-2, seed=3)
    loss, calls = _loss(killed.model), []

    def dies_at_step_4(rng):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss(rng)

    with pytest.raises(KeyboardInterrupt):
        killed.train(8, dies_at_step_4, every_seconds=0.0, desc="killed")  # saves every step
    resumed = Checkpointed(tmp_path / "killed.ckpt", _tiny_vae, lr=1e-2, seed=3)
    assert resumed.step == 3
    resumed.train(8, _loss(resumed.model), every_seconds=1e9, desc="resumed")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(3)
    untrained = _tiny_vae().decoder.conv_out.weight
    assert not torch.equal(straight.model.decoder.conv_out.weight, untrained)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = new_unet(4)
    cross = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert (cross.heads, cross.inner_dim // cross.heads) == (4, 16)
    # the first toy UNets: the same tensor shapes, but 32 heads of width 2
    old = UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": 32})
    Checkpointed(tmp_path / "unet.ckpt", lambda: old, lr=1e-4, seed=0).save()
    with pytest.raises(ValueError, match="attention_head_dim.*new --work folder"):
        load_weights(new_unet(4), tmp_path / "unet.ckpt")
    state = torch.load(tmp_path / "unet.ckpt", weights_only=False)
    del state["config"]  # checkpoints written before configs were recorded
    torch.save(state, tmp_path / "unet.ckpt")
    with pytest.raises(ValueError, match="not recorded"):
        load_weights(new_unet(4), tmp_path / "unet.ckpt")


def test_reconstruction_loss_weights_object_pixels():
    x = -torch.ones(1, 3, 2, 2)  # black: saturation 0
    x[0, 0, 0, 0] = 1.0  # one pure red pixel: saturation 1
    recon = x.clone()
    recon[0, :, 0, 0] += 0.3  # error 0.3 on each channel of the red pixel
    recon[0, :, 1, 1] += 0.1  # error 0.1 on a black pixel
    weights = torch.tensor([OBJECT_WEIGHT, 1.0, 1.0, 1.0])
    expected = (OBJECT_WEIGHT * 0.09 + 0.01) / weights.sum()
    assert _reconstruction_loss(recon, x).item() == pytest.approx(expected.item(), rel=1e-6)


def test_instruction_unet_starts_as_the_text_to_image_unet():
    torch.manual_seed(0)
    t2i = new_unet(4)
    ip2p = instruction_unet_from(t2i)
    assert ip2p.config.in_channels == 8
    latents, source = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, t2i.config.cross_attention_dim)
    with torch.no_grad():
        expected = t2i(latents, 500, encoder_hidden_states=text).sample
        got = ip2p(torch.cat([latents, source], 1), 500, encoder_hidden_states=text).sample
    assert torch.allclose(got, expected, atol=1e-5)
