"""Shared pytest configuration. Each section below belongs to one feature; keep them separate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


# --------------------------------------------------------------------------- slow tests
# Tests marked `slow` are skipped unless `--run-slow` is given or OCNNA_RUN_SLOW=1 is set.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test, skipped unless --run-slow or OCNNA_RUN_SLOW=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("OCNNA_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or OCNNA_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- model zoo
# Models from tools/export_zoo.py, exported on first use into a cache that survives sessions:
# <repo>/.cache/zoo (git-ignored) or $OCNNA_ZOO_CACHE, in a subfolder keyed by the exporter code
# and library versions. torch is imported only when a zoo model is first requested.

_zoo_cache = None


def zoo_model(name: str, exporter: str = "ts", bn: str = "kept") -> Path:
    """Path of zoo model `name` exported by `exporter` ("ts", "dynamo", "helper") with bn "kept" or
    "folded"; built on first use. A failed export skips the calling test with the exporter's error."""
    global _zoo_cache
    from export_zoo import ZooCache, ZooExportError

    if _zoo_cache is None:
        _zoo_cache = ZooCache(Path(os.environ.get("OCNNA_ZOO_CACHE", REPO / ".cache" / "zoo")))
    try:
        return _zoo_cache(name, exporter, bn)
    except ZooExportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def zoo():
    """`zoo(name, exporter="ts", bn="kept") -> Path` of the exported ONNX file (see zoo_model)."""
    return zoo_model


@pytest.fixture(scope="session")
def digits():
    """The embedded digits CNN (Conv-BN-Relu x3, GAP, Gemm), its split, the 8x8 images
    [N, 1, 8, 8] float32 in [0, 1] and the labels [N]."""
    import json
    from importlib import resources

    import numpy as np
    import onnx

    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = resources.files("onnx_ocnna.data")
    model = onnx.load(str(data / "digits_cnn.onnx"))
    split = json.loads((data / "digits_split.json").read_text())
    raw = sklearn_datasets.load_digits()
    return model, split, (raw.images / 16.0).astype(np.float32)[:, None], raw.target.astype(np.int64)
