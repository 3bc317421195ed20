"""The landscape analyses on an IMP run folder moved to :mod:`fastimp.analysis` (``barriers``,
``planes``, ``common``); these names stay importable from here."""
from __future__ import annotations

from fastimp.analysis.barriers import barrier_analysis
from fastimp.analysis.common import load_data, matching_error
from fastimp.analysis.paths import BARRIER_JSON
from fastimp.analysis.paths import plane_name as plane_json
from fastimp.analysis.planes import plane_analysis

__all__ = ["barrier_analysis", "plane_analysis", "load_data", "matching_error", "plane_json",
           "BARRIER_JSON"]
