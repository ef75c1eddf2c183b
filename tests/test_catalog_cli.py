"""The catalog on the command line and its link to the implemented methods' cards."""

from __future__ import annotations

from typer.testing import CliRunner

from editeval.cli import app, implemented_papers
from editeval.core import list_methods
from editeval.taxonomy import find_paper, query

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


def test_every_card_maps_to_its_catalog_entry_or_says_it_is_absent():
    linked = implemented_papers()
    for card in list_methods():
        paper = find_paper(arxiv_id=card.paper.arxiv_id) or find_paper(title=card.paper.title)
        if card.subcategory is None:
            assert paper is None, f"{card.name} is in the list but its card names no sub-category"
            assert "Not in the survey's paper list" in card.note
        else:
            assert paper is not None and paper.subcategory == card.subcategory
            assert paper.strategy == card.strategy
            assert linked[(paper.title, paper.subcategory)] == card.name
    assert ("Instructpix2pix: Learning to follow image editing instructions",
            "instructional-editing") in linked


def test_catalog_filters_like_the_library():
    result = runner.invoke(app, ["catalog", "--subcategory", "instructional-editing"], env=WIDE)
    assert result.exit_code == 0
    assert f"{len(query(subcategory='instructional-editing'))} of 122" in result.output
    assert "16 of 122 catalog entries" in result.output


def test_catalog_marks_implemented_papers():
    result = runner.invoke(app, ["catalog", "--implemented"], env=WIDE)
    assert result.exit_code == 0
    implemented = ["instructpix2pix", "null-text", "edict", "ddpm-inversion", "aidi", "p2p", "pnp",
                   "negative-prompt-inversion", "proxedit", "masactrl", "cyclediffusion",
                   "pix2pix-zero", "ebca", "sega", "ledits", "ledits++", "dds", "cds", "imagic",
                   "sine", "forgedit", "diffusion-disentanglement", "blended-latent-diffusion",
                   "blended-diffusion", "diffedit", "differential-diffusion"]
    assert f"{len(implemented)} of 122 catalog entries" in result.output
    assert all(name in result.output for name in implemented)
    # not in the survey's list: SDEdit (the baseline) and Direct Inversion (Ju et al.)
    assert "sdedit" not in result.output and "direct-inversion" not in result.output
    # nor the latent diffusion inpainting model (section 7's base) and outpainting with it
    assert "sd-inpainting" not in result.output and "outpainting" not in result.output
    assert "repaint" not in result.output  # RePaint (Lugmayr et al.) is not in the list either


def test_catalog_rejects_unknown_strategy():
    result = runner.invoke(app, ["catalog", "--strategy", "magic"])
    assert result.exit_code == 2 and "training-free" in result.output


def test_catalog_plot(tmp_path):
    out = tmp_path / "stats.png"
    result = runner.invoke(app, ["catalog", "--year", "2024", "--plot", str(out)], env=WIDE)
    assert result.exit_code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
