"""Shared fixtures. Real-data tests read ../shared/data and skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the same examples every time (no flaky discoveries on a submission); locally hypothesis
# explores new ones and remembers failures in .hypothesis/.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def fp32_auto(monkeypatch):
    """``precision="auto"`` resolves to fp32 even on CPUs with native bf16 (AVX512-BF16, AMX), for tests
    that compare against fp32 reference code at fp32 tolerances."""
    import scforge.nn.precision as precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the real data is not there (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ifnb_small(shared_data: Path):
    """The 2,000-cell ifnb subset (raw counts), read once per session; tests must copy before editing."""
    import anndata as ad

    return ad.read_h5ad(shared_data / "ifnb" / "ifnb_sub_2000.h5ad")
