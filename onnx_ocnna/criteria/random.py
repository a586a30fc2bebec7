"""Seeded random baseline: scores depend only on the ``seed`` option and the member's name."""

from __future__ import annotations

import hashlib
import operator

import numpy as np

from onnx_ocnna.criteria import register
from onnx_ocnna.criteria.base import Criterion, MemberInfo
from onnx_ocnna.errors import InputError


@register
class RandomScores(Criterion):
    """Uniform [0, 1) scores, shape [C]; option ``seed`` (int, default 0)."""

    name = "random"

    def weight_scores(self, member: MemberInfo) -> np.ndarray:
        try:
            seed = operator.index(self.options.get("seed", 0))
        except TypeError:
            raise InputError(f"seed must be an integer, got {self.options.get('seed')!r}") from None
        if seed < 0:
            raise InputError(f"seed must be non-negative, got {seed}")
        # A digest, not hash(): Python salts str hashes per process.
        name_key = int.from_bytes(hashlib.sha256(member.name.encode()).digest()[:8], "little")
        rng = np.random.default_rng(np.random.SeedSequence([seed, name_key]))
        return rng.random(member.channels)
