#!/usr/bin/env python
"""Build ``src/editeval/taxonomy/catalog.json`` from the survey's paper list.

Source: the README paper list of *Diffusion Model-Based Image Editing: A Survey* (Huang et al.,
TPAMI 2025, arXiv:2402.17525), kept at ``../shared/reference/survey_paper_list.md``.  Under
``# Papers`` it has one ``## <Strategy>`` heading per learning strategy and one
``### <Strategy>: <Sub-category>`` heading per sub-category, each followed by a Markdown table
``| [Title](url) | Publication | Date |``.

Writes one record per table row (a paper listed under two sub-categories gives two records),
sorted by (strategy, sub-category) in the survey's order, then date, then title; pretty-printed
with sorted keys, so a rerun on the same source gives identical bytes.  Headings that do not
match the known taxonomy (``editeval.taxonomy.catalog.SUBCATEGORIES``) or rows that cannot be
parsed are errors, not silently skipped.

    python scripts/build_catalog.py [--source PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "reference" / "survey_paper_list.md"
DEFAULT_OUT = REPO_ROOT / "src" / "editeval" / "taxonomy" / "catalog.json"

if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from editeval.taxonomy.catalog import (  # noqa: E402
    STRATEGIES,
    SUBCATEGORIES,
    SURVEY,
    normalize_arxiv_id,
)

_LINK_CELL = re.compile(r"^\[(?P<title>.+)\]\((?P<url>[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)\)$")
_PUBLICATION = re.compile(r"^(?P<venue>.*?)\s*(?P<year>(?:19|20)\d{2})$")
_DATE = re.compile(r"^(?P<year>(?:19|20)\d{2})(?:[.\-/](?P<month>\d{1,2}))?$")
_SEPARATOR = re.compile(r"^\|?[\s|:\-]+$")


class SourceError(ValueError):
    """The paper list does not have the expected structure."""


def _cells(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|"):
        body = body[:-1]
    # '|' inside a link's text or url would need escaping in Markdown tables; split on bare '|'.
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def parse_paper_list(text: str) -> list[dict]:
    """Records (unsorted, in source order) of the paper tables under ``# Papers``."""
    strategy_by_name = {name: sid for sid, name in STRATEGIES.items()}
    sub_by_key = {(sub.strategy, sub.name): slug for slug, sub in SUBCATEGORIES.items()}

    records: list[dict] = []
    in_papers = False
    strategy = subcategory = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if re.match(r"^#\s", line):
            in_papers = line[1:].strip().casefold() == "papers"
            strategy = subcategory = None
            continue
        if not in_papers:
            continue
        if line.startswith("## ") and not line.startswith("### "):
            name = line[3:].strip()
            if name not in strategy_by_name:
                raise SourceError(f"line {lineno}: unknown strategy heading {name!r}")
            strategy, subcategory = strategy_by_name[name], None
            continue
        if line.startswith("### "):
            head = line[4:].strip()
            prefix, sep, name = head.partition(":")
            if not sep or strategy is None or prefix.strip() != STRATEGIES[strategy]:
                raise SourceError(f"line {lineno}: heading {head!r} is not "
                                  f"'<{STRATEGIES.get(strategy, '?')}>: <sub-category>'")
            key = (strategy, name.strip())
            if key not in sub_by_key:
                raise SourceError(f"line {lineno}: unknown sub-category heading {head!r}")
            subcategory = sub_by_key[key]
            continue
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if _SEPARATOR.match(line) or cells[0].casefold() == "title":
            continue
        if subcategory is None:
            raise SourceError(f"line {lineno}: table row outside a sub-category section")
        if len(cells) != 3:
            raise SourceError(f"line {lineno}: expected 3 cells (title, publication, date): {line!r}")
        title_cell, publication, date = cells
        m = _LINK_CELL.match(title_cell)
        title, url = (m.group("title").strip(), m.group("url") or None) if m else (title_cell, None)
        if not title:
            raise SourceError(f"line {lineno}: empty title")

        pm = _PUBLICATION.match(publication)
        venue = (pm.group("venue") if pm else publication).strip()
        venue_year = int(pm.group("year")) if pm else None

        dm = _DATE.match(date)
        if dm:
            year, month = int(dm.group("year")), (int(dm.group("month")) if dm.group("month") else None)
            if month is not None and not 1 <= month <= 12:
                raise SourceError(f"line {lineno}: bad month in date {date!r}")
        elif not date and venue_year is not None:
            year, month = venue_year, None  # no date given: fall back to the venue's year
        else:
            raise SourceError(f"line {lineno}: cannot read date {date!r}")

        records.append({
            "title": title,
            "venue": venue,
            "venue_year": venue_year,
            "year": year,
            "month": month,
            "arxiv_id": normalize_arxiv_id(url),
            "url": url,
            "strategy": strategy,
            "subcategory": subcategory,
            "subcategory_name": SUBCATEGORIES[subcategory].name,
            "_date_missing": not dm,
        })

    seen = {r["subcategory"] for r in records}
    missing = [slug for slug in SUBCATEGORIES if slug not in seen]
    if missing:
        raise SourceError(f"no papers found for sub-categories: {', '.join(missing)}")
    return records


def _sort_key(rec: dict) -> tuple:
    return (
        list(STRATEGIES).index(rec["strategy"]),
        list(SUBCATEGORIES).index(rec["subcategory"]),
        rec["year"],
        rec["month"] or 0,
        rec["title"].casefold(),
        rec["url"] or "",
    )


def build_catalog(source: Path) -> tuple[dict, list[str]]:
    """The catalog document for ``source`` and a list of notes about oddities in the source."""
    raw = Path(source).read_bytes()
    records = parse_paper_list(raw.decode("utf-8"))
    records.sort(key=_sort_key)

    notes: list[str] = []
    by_title = defaultdict(list)
    for r in records:
        by_title["".join(ch for ch in r["title"].casefold() if ch.isalnum())].append(r)
    for recs in by_title.values():
        if len(recs) > 1:
            notes.append(f"listed {len(recs)}x: {recs[0]['title']!r} in "
                         + ", ".join(r["subcategory"] for r in recs))
    for r in records:
        if r["_date_missing"]:
            notes.append(f"no date (venue year used): {r['title']!r}")
        if r["arxiv_id"] is None:
            notes.append(f"no arXiv id (link: {r['url']}): {r['title']!r}")
        elif r["month"] is not None:
            yymm = r["arxiv_id"][:4]
            if yymm.isdigit() and (2000 + int(yymm[:2]), int(yymm[2:])) != (r["year"], r["month"]):
                notes.append(f"date {r['year']}.{r['month']:02d} != arXiv id {r['arxiv_id']}: "
                             f"{r['title']!r}")
        if r["venue_year"] is not None and r["venue_year"] < r["year"]:
            notes.append(f"venue year {r['venue_year']} before date year {r['year']}: {r['title']!r}")
    for r in records:
        del r["_date_missing"]

    doc = {
        "survey": SURVEY,
        "source": {"file": Path(source).name, "sha256": hashlib.sha256(raw).hexdigest()},
        "generator": "scripts/build_catalog.py",
        "counts": dict(Counter(r["subcategory"] for r in records)),
        "papers": records,
    }
    return doc, notes


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                    help=f"the survey's paper list (default: {DEFAULT_SOURCE})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"catalog JSON to write (default: {DEFAULT_OUT})")
    ap.add_argument("-q", "--quiet", action="store_true", help="do not print the summary")
    args = ap.parse_args(argv)

    if not args.source.is_file():
        ap.error(f"source not found: {args.source}")
    doc, notes = build_catalog(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(dumps(doc).encode("utf-8"))

    if not args.quiet:
        print(f"wrote {args.out}: {len(doc['papers'])} records", file=sys.stderr)
        for slug, sub in SUBCATEGORIES.items():
            print(f"  {sub.strategy:21s} {slug:35s} {doc['counts'].get(slug, 0):3d}", file=sys.stderr)
        for note in notes:
            print(f"  note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
