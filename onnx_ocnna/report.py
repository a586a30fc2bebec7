"""What a run did, as a printed table and as report.json (SPEC section 9)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.metrics import ModelStats
from onnx_ocnna.model_io import atomic_output


@dataclass
class Report:
    before: ModelStats
    after: ModelStats
    groups: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    accuracy: dict | None = None
    latency: list[dict] | None = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def rpr(self) -> float:
        """Remaining parameters ratio: parameters after / before."""
        return self.after.parameters / self.before.parameters if self.before.parameters else 1.0

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["rpr"] = self.rpr
        data["macs_ratio"] = self.macs_ratio
        return data

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.as_dict(), indent=1, default=_jsonable))

    def table(self) -> str:
        """The before/after table printed by the CLI."""
        rows = [
            ("parameters", f"{self.before.parameters:,}", f"{self.after.parameters:,}", f"{self.rpr:.3f}"),
            ("MACs (batch 1)", f"{self.before.macs:,}", f"{self.after.macs:,}", f"{self.macs_ratio:.3f}"),
            ("nodes", f"{self.before.nodes}", f"{self.after.nodes}", _ratio(self.after.nodes, self.before.nodes)),
            ("file size", _size(self.before.file_bytes), _size(self.after.file_bytes),
             _ratio(self.after.file_bytes, self.before.file_bytes)),
        ]
        if self.accuracy:
            acc = self.accuracy
            if acc.get("top1_before") is not None:
                rows.append(("top-1 accuracy", f"{100 * acc['top1_before']:.2f} %", f"{100 * acc['top1_after']:.2f} %",
                             f"{100 * (acc['top1_before'] - acc['top1_after']):+.2f} pt drop"))
            rows.append(("top-1 agreement", "100.00 %", f"{100 * acc['agreement']:.2f} %", f"n={acc['samples']}"))
        for row in self.latency or []:
            rows.append((f"latency b{row['batch']} t{row['threads']}", f"{row['before_ms']:.2f} ms",
                         f"{row['after_ms']:.2f} ms", f"{row['speedup']:.2f}x speed-up"))
        widths = [max(len(r[i]) for r in rows + [("", "before", "after", "ratio")]) for i in range(4)]
        lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                           enumerate(zip(("", "before", "after", "after/before"), widths)))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        pruned = sum(1 for g in self.groups if g.get("removed"))
        frozen = sum(1 for g in self.groups if g.get("frozen") and not g.get("prunable", True))
        lines.append(f"groups: {len(self.groups)}, pruned {pruned}, frozen {frozen}; RPR = {self.rpr:.4f}")
        lines.extend(f"note: {note}" for note in self.notes)
        allocation = self.extra.get("allocation")
        if allocation:
            lines.append("allocation (group: kept/channels, damage alone in nats, saved alone):")
            unit = "params" if allocation["objective"] == "params" else "MACs"
            for g in allocation["groups"]:
                if g["kept"] < g["channels"]:
                    saved = g["saved_params"] if unit == "params" else g["saved_macs"]
                    lines.append(f"  {g['members'][0]}{' +%d' % (len(g['members']) - 1) if len(g['members']) > 1 else ''}:"
                                 f" {g['kept']}/{g['channels']}, damage {g['damage']:.4f}, {saved:,} {unit}")
        return "\n".join(lines)


def plot_widths(report: Report, path: str | os.PathLike, title: str = "") -> None:
    """Bar chart of every layer's output channels, original against pruned (report.extra['widths'])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.extra.get("widths") or []
    if not rows:
        raise ValueError("the report holds no layer widths to plot")
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(rows) + 2), 3.8), dpi=120)
    ax.bar(x, [r["before"] for r in rows], color="#cfd8e3", label="original", width=0.85)
    ax.bar(x, [r["after"] for r in rows], color="tab:blue", label="pruned", width=0.85)
    ax.set_xlabel("layer (Conv / Gemm in graph order)")
    ax.set_ylabel("output channels")
    ax.set_xlim(-1, len(rows))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"widths: RPR {report.rpr:.3f}, MACs {report.macs_ratio:.3f}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def group_rows(analysis: ChannelAnalysis, removed: dict) -> list[dict]:
    rows = []
    for group in analysis.groups:
        rows.append({
            "id": group.id,
            "members": group.members,
            "channels": group.channels,
            "removed": int(len(removed.get(group.id, []))),
            "kept": int(group.channels - len(removed.get(group.id, []))),
            "prunable": group.prunable,
            "frozen": group.frozen_reason,
        })
    return rows


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return str(value)
