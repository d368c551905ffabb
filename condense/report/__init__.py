"""Leaderboard: read benchmark result files, aggregate, score (DD-Ranking style), render Markdown/HTML/plots.

Hydra-free; ``condense-report`` (condense/cli/report.py) is the command-line entry point.
"""

from condense.report.leaderboard import build_document, sections, write_report
from condense.report.published import PUBLISHED, published_value
from condense.report.records import Cell, CellKey, Results, aggregate, is_valid_result, load_results
from condense.report.scores import hlr, ior, lrs

__all__ = ["PUBLISHED", "Cell", "CellKey", "Results", "aggregate", "build_document", "hlr", "ior",
           "is_valid_result", "load_results", "lrs", "published_value",
           "sections", "write_report"]
