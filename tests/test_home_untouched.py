"""The suite writes caches and tracker logs into its temp dir, never the user's home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import HOME_WRITERS


def test_every_cache_and_tracker_dir_is_in_the_session_temp_dir(session_home: Path):
    for name in [*HOME_WRITERS, "FASTMID_CACHE"]:
        path = Path(os.environ[name])
        if name == "FASTMID_CACHE" and not path.is_relative_to(session_home):
            continue  # set by the user on purpose
        assert path.is_relative_to(session_home), name


def test_a_datasets_input_caches_in_the_session_temp_dir(session_home: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    from fastmid.recipe.data import load_records

    csv = tmp_path / "records.csv"
    csv.write_text("question,answer\nWhat is 1 + 1?,#### 2\n")
    assert load_records(csv)[0]["answer"] == "#### 2"
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    assert cache.is_relative_to(session_home)
    assert any(cache.rglob("*.arrow"))  # the arrow cache of that CSV went there
