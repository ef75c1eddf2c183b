"""The core API on the tiny pipelines: NFE accounting, determinism, parameters, inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from editeval.core import EditRequest, get_method, list_methods
from editeval.editing import EditInputError, edit


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 120x90 smooth RGB test image (not square, not a multiple of 8)."""
    y, x = np.mgrid[0:90, 0:120]
    rgb = np.stack([x * 2, y * 2, (x + y)], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize(
    "strength, steps, expected",
    [(0.5, 50, 50), (0.3, 10, 6), (0.75, 20, 30), (1.0, 8, 16), (0.29, 100, 56)],
)
def test_sdedit_nfe_follows_its_formula(tiny_sd, photo, strength, steps, expected):
    # formula: 2 * floor(num_inference_steps * strength); 0.29 * 100 is 28.999... in floats
    request = EditRequest(photo, target_prompt="a dog", params={
        "strength": strength, "num_inference_steps": steps})
    assert edit(request, "sdedit", pipe=tiny_sd).nfe == expected == 2 * int(steps * strength)


def test_sdedit_without_guidance_counts_one_pass_per_step(tiny_sd, photo):
    request = EditRequest(photo, target_prompt="a dog", params={
        "strength": 0.5, "num_inference_steps": 20, "guidance_scale": 1.0})
    assert edit(request, "sdedit", pipe=tiny_sd).nfe == 10


def test_instructpix2pix_nfe_is_three_per_step(tiny_ip2p, photo):
    request = EditRequest(photo, instruction="make it snow", params={"num_inference_steps": 7})
    result = edit(request, "instructpix2pix", pipe=tiny_ip2p)
    assert result.nfe == 21
    assert result.params == {"num_inference_steps": 7, "guidance_scale": 7.5,
                             "image_guidance_scale": 1.5}


@pytest.mark.parametrize("method, field", [("sdedit", "target_prompt"),
                                           ("instructpix2pix", "instruction")])
def test_equal_seeds_give_bit_identical_edits(tiny_sd, tiny_ip2p, photo, method, field):
    pipe = tiny_sd if method == "sdedit" else tiny_ip2p

    def run(seed: int) -> np.ndarray:
        request = EditRequest(photo, seed=seed, params={"num_inference_steps": 10},
                              **{field: "a snowy street"})
        return np.asarray(edit(request, method, pipe=pipe).model_image)

    first, again, other = run(1), run(1), run(2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_result_geometry_and_metadata(tiny_sd, photo):
    result = edit(EditRequest(photo, target_prompt="a dog", params={"num_inference_steps": 4}),
                  "sdedit", pipe=tiny_sd)
    assert result.image.size == (120, 90)  # back at the source size
    assert result.model_image.size == (64, 48)  # long side 64, sides multiples of 8
    assert result.method == "sdedit" and result.seed == 0 and result.wall_seconds > 0
    assert result.model.endswith("sd")


def test_unknown_parameter_lists_the_valid_ones(tiny_sd, photo):
    with pytest.raises(ValueError, match="no parameter strenght.*strength=0.5"):
        edit(EditRequest(photo, target_prompt="x", params={"strenght": 0.3}), "sdedit",
             pipe=tiny_sd)
    with pytest.raises(ValueError, match="not a float"):
        edit(EditRequest(photo, target_prompt="x", params={"strength": "high"}), "sdedit",
             pipe=tiny_sd)


def test_missing_input_names_the_flag(tiny_ip2p, photo):
    with pytest.raises(EditInputError, match="needs instruction \\(--instruction TEXT\\)"):
        edit(EditRequest(photo, target_prompt="a dog"), "instructpix2pix", pipe=tiny_ip2p)


def test_instructpix2pix_refuses_a_text_to_image_unet(tiny_sd, photo):
    with pytest.raises(ValueError, match="8-channel"):
        edit(EditRequest(photo, instruction="x"), "instructpix2pix", pipe=tiny_sd)


def test_unknown_method_lists_the_registry():
    with pytest.raises(KeyError, match="sdedit"):
        get_method("p2p-typo")


def test_cards_cite_papers_and_defaults():
    cards = {card.name: card for card in list_methods()}
    assert cards["sdedit"].paper.arxiv_id == "2108.01073"
    assert cards["sdedit"].defaults["strength"] == 0.5
    assert cards["instructpix2pix"].paper.arxiv_id == "2211.09800"
    assert cards["instructpix2pix"].defaults == {
        "num_inference_steps": 100, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
