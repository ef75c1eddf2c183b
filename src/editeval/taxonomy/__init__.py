"""The survey's paper catalog as data + queries.

Source: Yi Huang et al., *Diffusion Model-Based Image Editing: A Survey*, IEEE TPAMI 2025,
arXiv:2402.17525.  See :mod:`editeval.taxonomy.catalog`.
"""

from .catalog import (
    STRATEGIES,
    SUBCATEGORIES,
    SURVEY,
    Paper,
    Subcategory,
    counts_by_subcategory,
    counts_by_year,
    find_paper,
    load_catalog,
    normalize_arxiv_id,
    plot_statistics,
    query,
    resolve_strategy,
    resolve_subcategory,
)

__all__ = [
    "SURVEY",
    "STRATEGIES",
    "SUBCATEGORIES",
    "Subcategory",
    "Paper",
    "load_catalog",
    "query",
    "find_paper",
    "counts_by_subcategory",
    "counts_by_year",
    "plot_statistics",
    "normalize_arxiv_id",
    "resolve_strategy",
    "resolve_subcategory",
]
