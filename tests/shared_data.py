"""Where the real CIFAR-10 data and pretrained ResNets live (../shared/data beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("OCNNA_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MODELS = SHARED_DATA / "models"
CIFAR_TRAIN = SHARED_DATA / "cifar10" / "train"
CIFAR_TEST = SHARED_DATA / "cifar10" / "test"

needs_shared = pytest.mark.skipif(
    not MODELS.is_dir() or not CIFAR_TRAIN.is_dir(),
    reason=f"real data not found at {SHARED_DATA} (a clone without ../shared/data); set OCNNA_SHARED_DATA",
)
