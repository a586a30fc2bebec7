"""Pruning plans (SPEC section 6): the JSON that `score` writes and `--plan` applies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.errors import InputError, PlanError
from onnx_ocnna.jsonio import write_json

PLAN_FORMAT = "onnx-ocnna-plan"
PLAN_VERSION = 1


def build_plan(analysis: ChannelAnalysis, removed: dict[int, np.ndarray], model_sha256: str,
               scores: dict[int, np.ndarray] | None = None, extra: dict | None = None) -> dict:
    """A plan naming every group; ``remove`` lists channel indices of the group's first member.

    Args:
        removed: group id -> group channel indices to remove.
        scores: group id -> per-channel importance, [channels] (optional).
    """
    groups = []
    extra_entries = []
    for group in analysis.groups:
        by_member = _member_positions(group, removed.get(group.id, []))
        entry = {
            "id": group.id,
            "members": group.members,
            "channels": group.channels,
            "remove": by_member.pop(group.members[0], []),
        }
        # Channels the first member does not carry (a group tied through Concats) are named
        # through a member that does, in entries of their own.
        extra_entries.extend({"id": group.id, "members": [m], "remove": r} for m, r in by_member.items())
        if not group.prunable:
            entry["frozen"] = group.frozen_reason
        if scores is not None and group.id in scores:
            # A non-finite score (a steady filter's CV is 0/0) is written as null (jsonio).
            entry["scores"] = [float(s) for s in scores[group.id]]
        groups.append(entry)
    groups.extend(extra_entries)
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model_sha256": model_sha256, "groups": groups}
    if extra:
        plan.update(extra)
    return plan


def _member_positions(group, channels) -> dict[str, list[int]]:
    """Output-channel positions, per member, that show the given group channels: the first
    member wherever it can, another member for the channels it does not carry."""
    result: dict[str, list[int]] = {}
    for channel in sorted(int(c) for c in channels):
        for member in group.members:
            positions = np.flatnonzero(group.member_channels[member] == channel)
            if positions.size:
                result.setdefault(member, []).append(int(positions[0]))
                break
    return {member: sorted(p) for member, p in result.items()}


def save_plan(plan: dict, path: str | os.PathLike) -> None:
    write_json(path, plan)


def load_plan(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: plan file not found")
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a JSON plan ({exc})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("groups"), list):
        raise PlanError(f"{path}: a plan needs a 'groups' list")
    if plan.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        raise PlanError(f"{path}: format {plan.get('format')!r} is not {PLAN_FORMAT!r}")
    if int(plan.get("version", PLAN_VERSION)) > PLAN_VERSION:
        raise PlanError(f"{path}: plan version {plan['version']} is newer than this tool understands")
    return plan


def resolve_plan(plan: dict, analysis: ChannelAnalysis, model_sha256: str | None = None) -> dict[int, np.ndarray]:
    """Map a plan onto the analysed model: group id -> group channel indices to remove.

    Each entry's ``remove`` indexes the output channels of its first listed member: a Conv,
    Gemm or MatMul of the group, or a depthwise Conv that carries its channels; removing a
    channel of one member removes it from the member's whole group.
    """
    if model_sha256 and plan.get("model_sha256") and plan["model_sha256"] != model_sha256:
        raise PlanError("the plan was made for another model (model_sha256 differs)")
    removed: dict[int, set[int]] = {}
    for number, entry in enumerate(plan["groups"]):
        if not isinstance(entry, dict):
            raise PlanError(f"plan group #{number} is not an object")
        members = entry.get("members")
        if not members or not isinstance(members, list):
            raise PlanError(f"plan group #{number} names no members")
        groups = set()
        for name in members:
            group = analysis.group_of(name)
            if group is None:
                raise PlanError(f"plan names '{name}', which is not a Conv, Gemm or MatMul whose output channels lie "
                                "in a channel group of this model (a plan for another model?)")
            groups.add(group.id)
        if len(groups) > 1:
            raise PlanError(f"plan group #{number} lists members of different channel groups: {members}")
        group = analysis.groups[groups.pop()]
        first = group.channels_of(members[0])
        remove = entry.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in remove):
            raise PlanError(f"plan group #{number}: 'remove' must be a list of channel indices")
        for c in remove:
            if not 0 <= c < len(first):
                raise PlanError(f"plan removes channel {c} of '{members[0]}', which has {len(first)} channels")
        removed.setdefault(group.id, set()).update(int(first[c]) for c in remove)
    return {gid: np.array(sorted(channels), dtype=np.int64) for gid, channels in removed.items() if channels}
