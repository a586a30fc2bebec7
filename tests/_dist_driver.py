"""Test driver for tests/test_distributed.py: ``_dist_driver.py [driver options] [--] ARGS [-- ARGS ...]``.

Run under ``torchrun`` it runs ``onnx_ocnna.cli.main(ARGS)`` once per ``--``-separated command
(several commands share one launch, which saves the start-up time), with test instrumentation.

Driver options (test instrumentation, never in the CLI):

* ``--dump-dir D``: each rank writes ``D/rank<r>.json`` with the calibration samples each of its
  collect() calls saw and, after distillation, a SHA-256 of the returned model's initializers and the report's epochs.
* ``--die-after-epoch N``: every rank SIGKILLs itself right after epoch N's checkpoint is on disk.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import onnx

import onnx_ocnna.collect
import onnx_ocnna.distill
from onnx_ocnna import api, distributed
from onnx_ocnna.cli import main as cli_main




def weights_sha256(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(init.name.encode())
        digest.update(onnx.numpy_helper.to_array(init).tobytes())
    return digest.hexdigest()


class Dump:
    """Per-rank facts for the test, written as JSON after every addition."""

    def __init__(self, folder: str | None) -> None:
        self.path = None if folder is None else Path(folder) / f"rank{distributed.world().rank}.json"
        self.data: dict = {"collected_samples": []}

    def add(self, **items) -> None:
        self.data.update(items)
        if self.path is not None:
            self.path.write_text(json.dumps(self.data))


def instrument(dump: Dump, die_after_epoch: int | None) -> None:
    """Wrap collect (samples per rank) and distill (weights hash, kill switch)."""
    collect = onnx_ocnna.collect.collect

    @functools.wraps(collect)
    def counting_collect(*args, **kwargs):
        seen = collect(*args, **kwargs)
        dump.add(collected_samples=dump.data["collected_samples"] + [seen])
        return seen

    onnx_ocnna.collect.collect = counting_collect
    api.collect = counting_collect  # api imported the name

    distill = onnx_ocnna.distill.distill

    @functools.wraps(distill)
    def recording_distill(*args, **kwargs):
        def callback(record):
            if die_after_epoch is not None and record.epoch == die_after_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

        model, report = distill(*args, epoch_callback=callback, **kwargs)
        dump.add(weights_sha256=weights_sha256(model), epochs=[e.epoch for e in report.epochs],
                 resumed_after_epoch=report.settings.get("resumed_after_epoch"),
                 processes=report.settings["processes"])
        return model, report

    onnx_ocnna.distill.distill = recording_distill


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump-dir")
    parser.add_argument("--die-after-epoch", type=int)
    # Driver options come first; torchrun's argparse drops a "--" right after the script name.
    split = 0
    while split < len(argv) and argv[split] in ("--dump-dir", "--die-after-epoch"):
        split += 2
    own = parser.parse_args(argv[:split])
    rest = argv[split + 1 :] if argv[split : split + 1] == ["--"] else argv[split:]
    commands: list[list[str]] = [[]]
    for arg in rest:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    instrument(Dump(own.dump_dir), own.die_after_epoch)
    for command in commands:
        status = run_command(command)
        if status:
            return status
    return 0


def run_command(cli_args: list[str]) -> int:
    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
