"""Test driver for tests/test_distributed.py: ``_dist_driver.py [driver options] [--] ARGS [-- ARGS ...]``.

Run under ``torchrun`` it behaves like ``onnx-ocnna ARGS`` would with the issue-8 wiring, once per
``--``-separated command (several commands share one launch, which saves the start-up time):

* when the CLI already knows ``--checkpoint-dir`` (the wiring is in), it calls ``onnx_ocnna.cli.main``;
* until then it emulates the commands the tests and docs/distributed.md use -- ``score``,
  ``distill`` and the main command with ``--distill`` -- from the library, with the hooks of
  :mod:`onnx_ocnna.distributed` applied exactly where the CLI is to call them.

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
from onnx_ocnna.cli import build_parser, main as cli_main


def cli_is_wired() -> bool:
    """Whether the CLI has the checkpoint options (the sign that the torchrun wiring is in)."""
    main = build_parser()["main"]
    return any("--checkpoint-dir" in action.option_strings for action in main._actions)


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


# ---------------------------------------------------------------------------------------------
# Emulation of the wired CLI (the reference for the integration)


def sharded_scores(model: onnx.ModelProto, pruner: api.Pruner, calib, criterion: str, criterion_options: dict,
                   calibration_options: dict, progress: bool) -> api.Scores:
    """api.score with the hooks: shard_source before collect, gather_accumulators and all_sum after."""
    import time

    from onnx_ocnna.collect import member_scores_to_group
    from onnx_ocnna.criteria import get_criterion

    analysis = pruner.analysis
    crit = get_criterion(criterion, **criterion_options)
    members = [m for g in analysis.groups if g.prunable for m in g.members]
    start = time.perf_counter()
    source = distributed.shard_source(api.as_source(calib, model, **calibration_options))  # hook 1
    accumulators = {m: crit.new_accumulator(api.member_info(analysis, m)) for m in members}
    samples = onnx_ocnna.collect.collect(pruner.prepared_model(), analysis, crit, accumulators, source.batches(),
                                         total=len(source), progress=progress,
                                         threads=distributed.cpu_share())  # hook 1b
    accumulators = distributed.gather_accumulators(accumulators, crit.options)  # hook 2
    samples = distributed.all_sum(samples)  # hook 3
    member_scores = {m: acc.scores() for m, acc in accumulators.items()}
    groups = {g.id: member_scores_to_group(g, {m: member_scores[m] for m in g.members})
              for g in analysis.groups if g.prunable}
    return api.Scores(analysis, groups, criterion, samples, time.perf_counter() - start, member_scores)


def emulate_score(args) -> int:
    from onnx_ocnna.cli import _calibration_options, _criterion_options
    from onnx_ocnna.plan import build_plan, save_plan
    from onnx_ocnna.select import SelectionOptions, select

    model = api.as_model(args.input)
    pruner = api.Pruner(model)
    scores = sharded_scores(model, pruner, args.calib, args.criterion, _criterion_options(args),
                            _calibration_options(args), not args.quiet)
    options = SelectionOptions(percentile=args.percentile, scope=args.scope, min_channels=args.min_channels,
                               round_to=args.round_to, exclude=pruner.analysis.excluded(args.exclude))
    removed = select(pruner.analysis, scores.groups, options)
    plan = build_plan(pruner.analysis, removed, pruner.sha256, scores.groups,
                      extra={"criterion": args.criterion, "percentile": args.percentile,
                             "calibration_samples": scores.samples})
    if distributed.is_primary():  # hook 4: only rank 0 writes
        save_plan(plan, args.output)
        print(f"scored on {scores.samples} samples in {scores.seconds:.1f} s "
              f"({distributed.world().size} processes); wrote {args.output}")
    return 0


def emulate_main(args) -> int:
    """The main command with --distill: sharded scoring, prune, DDP distillation, rank 0 writes."""
    from onnx_ocnna.cli import _calibration_options, _criterion_options
    from onnx_ocnna.model_io import save_model

    model = api.as_model(args.input)
    pruner = api.Pruner(model)
    scores = sharded_scores(model, pruner, args.calib, args.criterion, _criterion_options(args),
                            _calibration_options(args), not args.quiet)
    pruned, report = api.compress(model, percentile=args.percentile, criterion=args.criterion,
                                  scores=scores, progress=not args.quiet)
    if args.distill:
        options = {**_calibration_options(args), "max_samples": None}
        train = api.as_source(args.train or args.calib, model, **options)
        held_out = api.as_source(args.eval, model, **options) if args.eval else None
        pruned, kd = onnx_ocnna.distill.distill(  # hook 5: checkpoint_dir / resume
            pruned, model, train.batches, epochs=args.epochs, lr=args.lr, temperature=args.temperature,
            alpha=args.alpha, augment=not args.no_augment, hflip=not args.no_flip,
            eval_batches=held_out.batches if held_out else None, progress=not args.quiet, seed=args.seed,
            checkpoint_dir=args.checkpoint_dir, resume=args.resume)
        report.extra["distillation"] = kd.to_dict()
    if distributed.is_primary():
        save_model(pruned, args.output)
        if args.report is not None:
            report.save(args.report)
    return 0


def emulate_distill(args) -> int:
    """The distill subcommand: DDP distillation of an already pruned model, rank 0 writes."""
    from onnx_ocnna.cli import _calibration_options
    from onnx_ocnna.model_io import save_model

    student, teacher = api.as_model(args.input), api.as_model(args.teacher)
    options = _calibration_options(args)
    options["max_samples"] = None if args.train else options["max_samples"]
    train = api.as_source(args.train or args.calib, teacher, **options)
    held_out = (api.as_source(args.eval, teacher, **{**_calibration_options(args), "max_samples": args.eval_samples})
                if args.eval else None)
    distilled, kd = onnx_ocnna.distill.distill(
        student, teacher, train.batches, epochs=args.epochs, lr=args.lr, temperature=args.temperature,
        alpha=args.alpha, augment=not args.no_augment, hflip=not args.no_flip,
        eval_batches=held_out.batches if held_out else None, progress=not args.quiet, seed=args.seed,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if distributed.is_primary():
        save_model(distilled, args.output)
        for epoch in kd.epochs:
            print(f"epoch {epoch.epoch}: loss {epoch.loss:.4f} ({epoch.seconds:.1f} s)")
        print(f"distilled in {kd.seconds:.1f} s ({distributed.world().size} processes); wrote {args.output}")
    return 0


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
    if cli_is_wired():
        return cli_main(cli_args)
    distributed.init()
    parsers = build_parser()
    if cli_args[0] == "score":
        return emulate_score(parsers["score"].parse_args(cli_args[1:]))
    name = "distill" if cli_args[0] == "distill" else "main"
    parser = parsers[name]
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true")
    if name == "distill":
        return emulate_distill(parser.parse_args(cli_args[1:]))
    return emulate_main(parser.parse_args(cli_args))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
