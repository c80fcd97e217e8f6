"""The benchmark scripts as modules for the tests: benchmarks/ goes on sys.path (throughput.py takes it off again
when it is imported), then ``common``, ``throughput`` and the official-style baseline are imported."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import throughput  # noqa: E402
from official_style import OfficialStyleMAE  # noqa: E402

__all__ = ["BENCH", "REPO", "OfficialStyleMAE", "common", "throughput"]
