"""What a run did, as a printed table and as report.json (SPEC section 9).

The JSON layout is versioned by :data:`SCHEMA_VERSION` and documented in the README
("The report"); a reader should check ``schema_version`` before relying on a key.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.evaluate import Accuracy, disturbed, robust_speedup
from onnx_ocnna.jsonio import write_json
from onnx_ocnna.metrics import ModelStats
from onnx_ocnna.model_io import atomic_output

# 1: the first versioned layout (before it: no schema_version, no command/input/output/
# calibration/versions, accuracy without stages, "inf" strings for non-finite scores).
SCHEMA_VERSION = 1

# The stages a model goes through, in order, and how the table names them.
STAGES = {"original": "original", "pruned": "after pruning", "reconstructed": "after reconstruction",
          "distilled": "after distillation", "int8": "after INT8 quantization", "compressed": "compressed"}

# report.timings keys, in the order the stages run, and their printed names.
TIMINGS = {"load_s": "loading", "synthesize_s": "calibration synthesis", "drop_blocks_s": "block removal (SI)", "score_s": "scoring", "fc_width_s": "FC widths (CSI)",
           "search_s": "max-drop search (every candidate)", "allocate_s": "allocation", "rewrite_s": "selection and rewrite", "reconstruct_s": "reconstruction",
           "distill_s": "distillation", "evaluate_s": "evaluation", "bench_s": "latency",
           "quantize_s": "quantization", "write_s": "writing"}


@dataclass
class Report:
    """Everything a run did; ``as_dict`` is report.json.

    Attributes:
        accuracy: held-out figures (SPEC section 9): ``samples``, ``labelled``, ``top1_before`` /
            ``top1_after`` (None without labels) and ``agreement`` of the model ``after``
            describes, and ``stages``, one row per stage measured (see :meth:`record_accuracy`).
        timings: wall seconds per stage, keys as in :data:`TIMINGS`, plus ``total_s`` for a CLI run.
        command, input, output, calibration: what was run on what (set by the CLI).
    """

    before: ModelStats
    after: ModelStats
    groups: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    accuracy: dict | None = None
    latency: list[dict] | None = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    command: list[str] | None = None
    input: dict | None = None
    output: dict | None = None
    calibration: dict | None = None

    @property
    def rpr(self) -> float:
        """Remaining parameters ratio: parameters after / before."""
        return self.after.parameters / self.before.parameters if self.before.parameters else 1.0

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    def record_accuracy(self, stage: str, accuracy: Accuracy, current: bool = True) -> None:
        """Add one stage (a key of :data:`STAGES`) to the held-out story.

        ``current``: ``accuracy`` is of the model ``after`` describes (the float model written),
        so the top-level figures become this stage's; an INT8 copy is a stage, not current.
        """
        if self.accuracy is None or "stages" not in self.accuracy:
            self.accuracy = {"samples": accuracy.samples, "labelled": accuracy.top1_before is not None,
                             "top1_before": accuracy.top1_before, "top1_after": None, "agreement": None,
                             "stages": [{"stage": "original", "top1": accuracy.top1_before, "agreement": 1.0}]}
        self.accuracy["stages"].append({"stage": stage, "top1": accuracy.top1_after, "agreement": accuracy.agreement})
        if current:
            self.accuracy.update(top1_after=accuracy.top1_after, agreement=accuracy.agreement)

    def as_dict(self) -> dict:
        data = {"schema_version": SCHEMA_VERSION, "command": self.command, "versions": versions(),
                "input": self.input, "output": self.output, "calibration": self.calibration}
        data.update(asdict(self))
        data["rpr"] = self.rpr
        data["macs_ratio"] = self.macs_ratio
        return data

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.as_dict())

    def table(self) -> str:
        """The table printed by the CLI: sizes, latency, held-out accuracy per stage, time per stage."""
        rows = [
            ("parameters", f"{self.before.parameters:,}", f"{self.after.parameters:,}", f"{self.rpr:.3f}"),
            ("MACs (batch 1)", f"{self.before.macs:,}", f"{self.after.macs:,}", f"{self.macs_ratio:.3f}"),
            ("nodes", f"{self.before.nodes:,}", f"{self.after.nodes:,}", _ratio(self.after.nodes, self.before.nodes)),
            ("file size", _size(self.before.file_bytes), _size(self.after.file_bytes),
             _ratio(self.after.file_bytes, self.before.file_bytes)),
        ]
        for row in self.latency or []:
            speedup = f"{row['speedup']:.2f}x speed-up"
            if disturbed(row):  # the median is an interrupted run: say what the robust reading gives
                value, source = robust_speedup(row)
                speedup += f" (disturbed by other load; {source} {value:.2f}x)"
            rows.append((f"latency b{row['batch']} t{row['threads']} (median)", f"{row['before_ms']:.2f} ms",
                         f"{row['after_ms']:.2f} ms", f"{row['after_ms'] / row['before_ms']:.3f}", speedup))
        lines = _columns([("", "original", "compressed", "compressed/original")] + rows, right_from=1)
        pruned = sum(1 for g in self.groups if g.get("removed"))
        frozen = sum(1 for g in self.groups if g.get("frozen") and not g.get("prunable", True))
        lines.append(f"groups: {len(self.groups)}, pruned {pruned}, frozen {frozen}; RPR = {self.rpr:.4f}")
        if self.accuracy:
            lines.extend(self._accuracy_lines())
        if self.timings:
            lines.extend(self._timing_lines())
        lines.extend(f"note: {note}" for note in self.notes)
        allocation = self.extra.get("allocation")
        if allocation:
            lines.append("allocation (group: kept/channels, damage alone in nats, saved alone):")
            unit = "params" if allocation["objective"] == "params" else "MACs"
            for g in allocation["groups"]:
                if g["kept"] < g["channels"]:
                    saved = g["saved_params"] if unit == "params" else g["saved_macs"]
                    lines.append(f"  {g['members'][0]}{' +%d' % (len(g['members']) - 1) if len(g['members']) > 1 else ''}:"
                                 f" {g['kept']}/{g['channels']}, damage {max(g['damage'], 0.0):.4f}, {saved:,} {unit}")
        for row in self.extra.get("fc_width") or []:
            # The CSI curve at 1, 2, 4, ... neurons and the whole layer: where it saturates.
            steps = sorted({min(2 ** i, row["channels"]) for i in range(row["channels"].bit_length() + 1)})
            curve = ", ".join(f"{n}: {row['curve'][n - 1]:.3f}" for n in steps)
            lines.append(f"fc width (CSI): {row['layer']} {row['kept']}/{row['channels']}; CSI by neurons kept {curve}")
        return "\n".join(lines)

    def _accuracy_lines(self) -> list[str]:
        acc = self.accuracy
        stages = acc.get("stages") or [  # set directly (compare_accuracy): the two ends only
            {"stage": "original", "top1": acc.get("top1_before"), "agreement": 1.0},
            {"stage": "compressed", "top1": acc.get("top1_after"), "agreement": acc.get("agreement")}]
        labelled = stages[0]["top1"] is not None
        if labelled:
            head = (f"held-out top-1, {acc['samples']:,} labelled samples",
                    "top-1", "change", "agreement with original")
            base = stages[0]["top1"]
            rows = [(f"  {STAGES.get(s['stage'], s['stage'])}", _percent(s["top1"]),
                     "" if i == 0 else _change(base, s["top1"]), _percent(s["agreement"]))
                    for i, s in enumerate(stages)]
        else:
            # Without labels, agreement (the model's top-1 class equals the original's) is the measure.
            head = (f"held-out, {acc['samples']:,} samples without labels", "top-1 agreement with original")
            rows = [(f"  {STAGES.get(s['stage'], s['stage'])}", _percent(s["agreement"])) for s in stages[1:]]
        return _columns([head] + rows, right_from=1)

    def _timing_lines(self) -> list[str]:
        known = [f"{name} {_seconds(self.timings[key])}" for key, name in TIMINGS.items()
                 if self.timings.get(key) is not None]
        total = self.timings.get("total_s")
        if total is not None:
            known.append(f"total {_seconds(total)}")
        lines, line = [], "time:"
        for i, item in enumerate(known):  # wrapped between stages, never inside one
            piece = item + ("," if i < len(known) - 1 else "")
            if len(line) + len(piece) >= 100 and line != "time:":
                lines.append(line)
                line = "     "
            line += " " + piece
        return lines + [line]


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


def versions() -> dict:
    """Versions of the tool, Python and the libraries behind a result (None: not installed)."""
    from importlib import metadata

    from onnx_ocnna import __version__

    found = {"onnx_ocnna": __version__, "python": platform.python_version()}
    # From the installed metadata, so that asking does not import torch.
    for name in ("onnx", "onnxruntime", "onnx_graphsurgeon", "numpy", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def file_record(path: str | os.PathLike) -> dict:
    """Path, size and SHA-256 of a written or read model file, and of its external data files."""
    import onnx

    path = Path(path)
    record = _digest(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file (or unreadable): the bytes are what is recorded
        return record
    locations = sorted({entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for entry in t.external_data if entry.key == "location"})
    if locations:
        record["external_data"] = [_digest(path.parent / name) for name in locations]
    return record


def _digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _columns(rows: list[tuple[str, ...]], right_from: int) -> list[str]:
    """Rows as aligned text: the first column left-aligned, columns from ``right_from`` on right-aligned;
    a row may carry one more cell than the header (a comment, written after the last column)."""
    count = len(rows[0])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(count)]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + list(row[count:])).rstrip())
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _change(base: float | None, value: float | None) -> str:
    """Points lost (drop) or won (gain) against the original, never a bare signed number."""
    if base is None or value is None:
        return "-"
    points = round(100 * (base - value), 2) + 0.0  # + 0.0: no "-0.00"
    return f"drop {points:.2f} pt" if points >= 0 else f"gain {-points:.2f} pt"


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
