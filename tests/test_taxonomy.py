"""Tests of editeval.taxonomy: the catalog of the survey "Diffusion Model-Based Image Editing:
A Survey" (Huang et al., TPAMI 2025, arXiv:2402.17525) and scripts/build_catalog.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from editeval.taxonomy import (
    STRATEGIES,
    SUBCATEGORIES,
    Paper,
    counts_by_subcategory,
    counts_by_year,
    find_paper,
    load_catalog,
    normalize_arxiv_id,
    plot_statistics,
    query,
)

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "survey_paper_list.md"
needs_source = pytest.mark.skipif(
    not SOURCE.is_file(), reason=f"survey paper list not available at {SOURCE} (../shared absent)"
)

# Rows per sub-category, counted by reading survey_paper_list.md (and cross-checked against the
# file below when it is present).
EXPECTED_COUNTS = {
    "domain-specific-editing": 12,
    "reference-attribute-guided-editing": 15,
    "instructional-editing": 16,
    "pseudo-target-retrieval": 3,
    "denoising-model-finetuning": 3,
    "embeddings-finetuning": 4,
    "guidance-with-hypernetworks": 2,
    "latent-variable-optimization": 9,
    "hybrid-finetuning": 4,
    "input-text-refinement": 4,
    "inversion-sampling-modification": 19,
    "attention-modification": 13,
    "mask-guidance": 14,
    "multi-noise-redirection": 4,
}
EXPECTED_TOTAL = 122  # 121 distinct papers; one is listed under two sub-categories


def _source_sections() -> dict[str, list[str]]:
    """Independent of the build script: '### Strategy: Sub' heading -> titles of its table rows,
    for the part of the file under '# Papers'."""
    sections: dict[str, list[str]] = {}
    current, in_papers = None, False
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            in_papers, current = line.strip() == "# Papers", None
        elif in_papers and line.startswith("### "):
            current = line[4:].strip()
            sections[current] = []
        elif in_papers and current and line.startswith("| ["):
            sections[current].append(re.match(r"\| \[(.+?)\]\(", line).group(1).strip())
    return sections


def _load_script():
    spec = importlib.util.spec_from_file_location("build_catalog", REPO / "scripts" / "build_catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def papers() -> list[Paper]:
    return load_catalog()


# --------------------------------------------------------------------------- counts vs source

def test_taxonomy_shape():
    assert list(STRATEGIES) == ["training-based", "test-time-finetuning", "training-free"]
    assert len(SUBCATEGORIES) == 14
    assert list(SUBCATEGORIES) == list(EXPECTED_COUNTS)
    per_strategy = {sid: [s for s, sub in SUBCATEGORIES.items() if sub.strategy == sid] for sid in STRATEGIES}
    assert [len(v) for v in per_strategy.values()] == [4, 5, 5]
    # namedtuple unpacks as (name, strategy, ...)
    name, strategy, *_ = SUBCATEGORIES["attention-modification"]
    assert (name, strategy) == ("Attention Modification", "training-free")


def test_catalog_counts(papers):
    assert len(papers) == EXPECTED_TOTAL
    assert counts_by_subcategory(papers) == EXPECTED_COUNTS
    assert list(counts_by_subcategory(papers)) == list(SUBCATEGORIES)  # survey order
    assert {p.strategy for p in papers} == set(STRATEGIES)
    assert {p.subcategory for p in papers} == set(SUBCATEGORIES)
    assert len({(p.title, p.subcategory) for p in papers}) == EXPECTED_TOTAL
    assert len({p.title for p in papers}) == EXPECTED_TOTAL - 1
    assert counts_by_year(papers) == {2021: 4, 2022: 25, 2023: 82, 2024: 10, 2025: 1}
    assert sum(counts_by_year(papers).values()) == EXPECTED_TOTAL


@needs_source
def test_counts_equal_source_list(papers):
    sections = _source_sections()
    assert len(sections) == 14
    from_source = {h: len(titles) for h, titles in sections.items()}
    # the hard-coded numbers agree with the file ...
    expected_by_heading = {
        f"{STRATEGIES[sub.strategy]}: {sub.name}": EXPECTED_COUNTS[slug] for slug, sub in SUBCATEGORIES.items()
    }
    assert from_source == expected_by_heading
    assert list(from_source) == list(expected_by_heading)  # same order as the survey's list
    assert sum(from_source.values()) == EXPECTED_TOTAL
    # ... and the catalog holds exactly the list's (title, section) pairs
    in_catalog = sorted((p.title, f"{STRATEGIES[p.strategy]}: {p.subcategory_name}") for p in papers)
    in_source = sorted((t, h) for h, titles in sections.items() for t in titles)
    assert in_catalog == in_source


@needs_source
def test_rebuild_is_byte_identical(tmp_path):
    script = _load_script()
    out = tmp_path / "catalog.json"
    assert script.main(["--source", str(SOURCE), "--out", str(out), "--quiet"]) == 0
    packaged = resources.files("editeval.taxonomy").joinpath("catalog.json").read_bytes()
    assert out.read_bytes() == packaged
    out2 = tmp_path / "again.json"
    script.main(["--source", str(SOURCE), "--out", str(out2), "--quiet"])
    assert out2.read_bytes() == packaged


@needs_source
def test_build_rejects_unknown_heading(tmp_path):
    script = _load_script()
    bad = tmp_path / "list.md"
    bad.write_text(SOURCE.read_text(encoding="utf-8").replace(
        "### Training and Finetuning Free: Mask Guidance", "### Training and Finetuning Free: Mask Magic"),
        encoding="utf-8")
    with pytest.raises(script.SourceError, match="Mask Magic"):
        script.main(["--source", str(bad), "--out", str(tmp_path / "x.json"), "--quiet"])
    assert not (tmp_path / "x.json").exists()


def test_build_on_synthetic_list(tmp_path):
    """The parser on a small list written here (runs without ../shared): link forms, venues, dates."""
    script = _load_script()
    lines = ["# Intro", "| [Not a paper](https://arxiv.org/abs/9999.99999) | X 2020 | 2020.01 |", "# Papers"]
    rows = {
        "mask-guidance": [
            "| [Alpha: A](https://arxiv.org/abs/2211.09800v2) | CVPR workshop 2023 | 2022.11 |",
            "| [Beta](http://arxiv.org/pdf/2301.00001v1.pdf) | arXiv 2023 | 2023.01 |",
        ],
        "attention-modification": ["| [Gamma](https://openreview.net/forum?id=abc) | ICLR 2023 | 2022 |"],
    }
    strategy = None
    for slug, sub in SUBCATEGORIES.items():
        if sub.strategy != strategy:
            strategy = sub.strategy
            lines.append(f"## {STRATEGIES[strategy]}")
        lines += [f"### {STRATEGIES[strategy]}: {sub.name}", "", "| Title | Publication | Date |",
                  "|---|---|---|"]
        lines += rows.get(slug, [f"| [Paper {slug}](https://example.org/{slug}) | arXiv 2024 | 2024.02 |"])
    lines.append("# Benchmark")
    lines.append("| [Also not a paper](https://arxiv.org/abs/8888.88888) | Y 2021 | 2021.01 |")
    src = tmp_path / "list.md"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "c.json"
    script.main(["--source", str(src), "--out", str(out), "--quiet"])
    recs = {r["title"]: r for r in json.loads(out.read_text(encoding="utf-8"))["papers"]}
    assert len(recs) == 12 + 3  # one placeholder row for each of the other 12 sub-categories
    assert "Not a paper" not in recs and "Also not a paper" not in recs
    assert recs["Alpha: A"] == {
        "title": "Alpha: A", "venue": "CVPR workshop", "venue_year": 2023, "year": 2022, "month": 11,
        "arxiv_id": "2211.09800", "url": "https://arxiv.org/abs/2211.09800v2", "strategy": "training-free",
        "subcategory": "mask-guidance", "subcategory_name": "Mask Guidance",
    }
    assert recs["Beta"]["arxiv_id"] == "2301.00001"
    assert (recs["Gamma"]["arxiv_id"], recs["Gamma"]["year"], recs["Gamma"]["month"]) == (None, 2022, None)
    # sorted: mask-guidance records by date
    ordered = [r["title"] for r in json.loads(out.read_text(encoding="utf-8"))["papers"]]
    assert ordered.index("Alpha: A") < ordered.index("Beta")


# --------------------------------------------------------------------------- records

def test_records_are_consistent(papers):
    for p in papers:
        assert SUBCATEGORIES[p.subcategory].strategy == p.strategy
        assert SUBCATEGORIES[p.subcategory].name == p.subcategory_name
        assert isinstance(p.year, int) and 2015 <= p.year <= 2030
        assert p.month is None or 1 <= p.month <= 12
        assert p.title and p.venue
        if p.arxiv_id is not None:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", p.arxiv_id), p.arxiv_id
            assert p.arxiv_id in p.url
    assert sum(p.arxiv_id is not None for p in papers) == 95
    with pytest.raises(dataclasses.FrozenInstanceError):
        papers[0].title = "x"  # type: ignore[misc]
    order = [(list(SUBCATEGORIES).index(p.subcategory), p.year, p.month or 0) for p in papers]
    assert order == sorted(order)


def test_known_papers(papers):
    ip2p = find_paper(title="InstructPix2Pix: Learning to Follow Image Editing Instructions")
    assert ip2p is not None
    assert (ip2p.strategy, ip2p.subcategory, ip2p.subcategory_name) == (
        "training-based", "instructional-editing", "Instructional Editing")
    assert (ip2p.venue, ip2p.venue_year, ip2p.year, ip2p.month, ip2p.date) == ("CVPR", 2023, 2022, 11, "2022.11")
    assert ip2p.arxiv_id is None  # the list links the CVF page, not arXiv
    assert ip2p.url.startswith("https://openaccess.thecvf.com/content/CVPR2023/html/Brooks_InstructPix2Pix")

    p2p = find_paper(title="prompt to prompt image editing with cross-attention control")
    assert (p2p.strategy, p2p.subcategory, p2p.venue, p2p.venue_year, p2p.year, p2p.month) == (
        "training-free", "attention-modification", "ICLR", 2023, 2022, 8)
    assert p2p.arxiv_id is None and p2p.url == "https://openreview.net/forum?id=_CDixzkzeyb"
    assert p2p.strategy_name == "Training and Finetuning Free"

    imagic = find_paper(title="IMAGIC: text-based real image editing with diffusion models!")
    assert (imagic.strategy, imagic.subcategory, imagic.venue, imagic.year, imagic.month) == (
        "test-time-finetuning", "hybrid-finetuning", "CVPR", 2022, 10)
    assert imagic.arxiv_id is None

    drag = find_paper(arxiv_id="abs/2306.14435v2")
    assert drag.title.startswith("DragDiffusion") and drag.subcategory == "latent-variable-optimization"
    assert find_paper(arxiv_id="https://arxiv.org/pdf/2306.14435.pdf") == drag
    assert find_paper(arxiv_id="2306.14435", title=drag.title.upper()) == drag
    assert find_paper(arxiv_id="2306.14435", title="Imagic") is None
    masa = find_paper(arxiv_id="arXiv:2304.08465")
    assert (masa.subcategory, masa.venue, masa.venue_year) == ("attention-modification", "ICCV", 2023)
    diffstyler = find_paper(arxiv_id="2211.10682")  # listed as a .../pdf/2211.10682.pdf link
    assert diffstyler.title.startswith("Diffstyler") and diffstyler.venue == "TNNLS"
    emu = find_paper(arxiv_id="2311.10089")  # listed as an http:// link
    assert emu.subcategory == "instructional-editing"
    assert find_paper(arxiv_id="2402.17525") is None
    assert find_paper(title="No such paper") is None
    with pytest.raises(ValueError):
        find_paper()


def test_duplicate_entry_is_kept_per_subcategory():
    recs = query(search="Energy-Based Cross Attention")
    assert [p.subcategory for p in recs] == ["attention-modification", "mask-guidance"]
    assert {p.arxiv_id for p in recs} == {"2306.09869"}
    assert find_paper(arxiv_id="2306.09869").subcategory == "attention-modification"


def test_normalize_arxiv_id():
    assert normalize_arxiv_id("abs/2211.09800v2") == "2211.09800"
    assert normalize_arxiv_id("https://arxiv.org/pdf/2211.09800v3.pdf") == "2211.09800"
    assert normalize_arxiv_id("http://arxiv.org/abs/2312.03594") == "2312.03594"
    assert normalize_arxiv_id("arXiv:2211.09800") == "2211.09800"
    assert normalize_arxiv_id("2211.09800") == "2211.09800"
    assert normalize_arxiv_id("https://dl.acm.org/doi/abs/10.1145/3588432.3591513") is None
    assert normalize_arxiv_id("https://openreview.net/forum?id=_CDixzkzeyb") is None
    assert normalize_arxiv_id(None) is None


# --------------------------------------------------------------------------- queries

def test_query_by_strategy(papers):
    assert query() == papers
    by_id = query(strategy="training-based")
    assert len(by_id) == 12 + 15 + 16 + 3
    assert {p.strategy for p in by_id} == {"training-based"}
    assert query(strategy="Training-Based") == by_id
    assert query(strategy="  TRAINING-based ") == by_id
    assert len(query(strategy="test-time-finetuning")) == 3 + 4 + 2 + 9 + 4
    assert query(strategy="Testing-Time Finetuning") == query(strategy="test-time-finetuning")
    free = query(strategy="training and finetuning free")
    assert len(free) == 4 + 19 + 13 + 14 + 4 and free == query(strategy="training-free")
    assert find_paper(title="Imagic: Text-Based Real Image Editing With Diffusion Models") in query(
        strategy="test-time-finetuning")


def test_query_by_subcategory():
    slug = query(subcategory="instructional-editing")
    assert len(slug) == 16
    assert query(subcategory="Instructional Editing") == slug
    assert query(subcategory="instructional editing via full supervision") == slug  # survey's name
    assert query(subcategory="Training-Based: Instructional Editing") == slug  # heading as in the list
    assert find_paper(title="Instructpix2pix: Learning to follow image editing instructions") in slug
    assert query(subcategory="Inversion/Sampling Modification") == query(
        subcategory="inversion-sampling-modification")
    assert len(query(subcategory="inversion-sampling-modification")) == 19
    # the list's heading has a typo ("Denosing"); both spellings work
    assert len(query(subcategory="Denosing Model Finetuning")) == 3
    assert query(subcategory="denoising model finetuning") == query(subcategory="denoising-model-finetuning")
    hyper = query(subcategory="guidance-with-hypernetworks")
    assert sorted(p.title for p in hyper) == [
        "Inversion-based creativity transfer with diffusion models",
        "StyleDiffusion: Prompt-Embedding Inversion for Text-Based Editing",
    ]


def test_query_by_year_and_search():
    assert [p.title for p in query(year=2025)] == [
        "KV-Edit: Training-Free Image Editing for Precise Background Preservation"]
    assert sorted(p.title for p in query(year=2021)) == [
        "Blended diffusion for text-driven editing of natural images",
        "Diffusion autoencoders: Toward a meaningful and decodable representation",
        "Diffusionclip: Text-guided diffusion models for robust image manipulation",
        "Unit-ddpm: Unpaired image translation with denoising diffusion probabilistic models",
    ]
    assert len(query(year=[2024, 2025])) == 11
    assert len(query(year=range(2021, 2023))) == 4 + 25
    drag = query(search="DRAG")
    assert sorted(p.title.split(":")[0] for p in drag) == ["DragDiffusion", "Dragondiffusion", "FreeDrag",
                                                           "StableDrag"]
    assert {p.subcategory for p in drag} == {"latent-variable-optimization"}
    # search covers the venue too
    assert sorted(p.title for p in query(search="siggraph")) == [
        "Blended latent diffusion", "Zero-shot image-to-image translation"]
    assert len(query(search="CVPR workshop")) == 3


def test_query_combinations(papers):
    got = query(strategy="training-free", year=2023, search="inversion")
    assert sorted(p.title for p in got) == sorted([
        "Inversion-Free Image Editing with Natural Language",
        "Fixed-point Inversion for Text-to-image diffusion models",
        "Tuning-Free Inversion-Enhanced Control for Consistent Image Editing",
        "Effective real image editing with accelerated iterative diffusion inversion",
        "Negative-prompt Inversion: Fast Image Inversion for Editing with Text-guided Diffusion Models",
        "An Edit Friendly DDPM Noise Space: Inversion and Manipulations",
        "Object-aware Inversion and Reassembly for Image Editing",
        "Ledits: Real image editing with ddpm inversion and semantic guidance",
    ])
    assert [p.title for p in query(subcategory="mask-guidance", year=2022)] == [  # catalog order: by date
        "Blended latent diffusion",  # 2022.06
        "DiffEdit: Diffusion-based semantic image editing with mask guidance",  # 2022.10
        "Text-guided mask-free local image retouching",  # 2022.12
    ]
    assert query(strategy="training-based", subcategory="mask-guidance") == []
    assert query(strategy="test-time-finetuning", subcategory="Hybrid Finetuning", search="imagic") == [
        find_paper(title="Imagic: Text-Based Real Image Editing With Diffusion Models")]
    subset = query(strategy="training-based")
    assert query(subset, year=2024) == query(strategy="training-based", year=2024)
    assert {p.title.split(":")[0] for p in query(subset, year=2024)} == {
        "TexFit", "FreeEdit", "EditWorld", "InstructGIE", "MagicEraser"}
    assert query([], strategy="training-free") == []


def test_unknown_values_raise():
    with pytest.raises(ValueError) as err:
        query(strategy="zero-shot")
    for sid in STRATEGIES:
        assert sid in str(err.value)
    with pytest.raises(ValueError) as err:
        query(subcategory="style transfer")
    assert "mask-guidance" in str(err.value) and "multi-noise-redirection" in str(err.value)
    with pytest.raises(ValueError):
        query(strategy="training-based", subcategory="nope")


# --------------------------------------------------------------------------- plot

def test_plot_statistics(tmp_path, papers):
    pytest.importorskip("matplotlib", reason="matplotlib is needed for plot_statistics")
    out = plot_statistics(papers, tmp_path / "stats.png")
    assert out == tmp_path / "stats.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    from PIL import Image

    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        w, h = im.size
        assert w > 800 and h > 400 and w > h
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # not a blank canvas

    svg = plot_statistics(query(strategy="training-free"), tmp_path / "sub" / "free.svg")
    assert b"<svg" in svg.read_bytes()[:2000]
    no_ext = plot_statistics(query(year=2025), tmp_path / "plain")
    assert no_ext.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
