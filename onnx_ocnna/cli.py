"""Command line: ``onnx-ocnna IN OUT [options]`` and the subcommands, a thin layer over api.py.

Every failure the user can cause ends with one line on stderr and a non-zero exit status;
nothing is written unless the result passed validation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from onnx_ocnna import __version__
from onnx_ocnna.errors import OcnnaError

CRITERIA_CHOICES = ["ocnna", "l1", "l2", "group-l2", "apoz", "mean-activation", "random", "si"]
DEFAULT_CRITERION = "ocnna"
# Without --criterion on synthesized data: OCNNA's ranking from synthetic images loses most of
# the gap to real data (ResNet-20, MACs 0.7: 68.50 % against 75.18 % with group-l2's, 79.68 %
# on real images; docs/synthesize.md).
SYNTHETIC_DATA_CRITERION = "group-l2"
EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _add_calibration_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("calibration data")
    group.add_argument("--calib", metavar="DATA", required=required,
                       help="image folder (class sub-folders give labels), .npy, or .npz keyed by input name")
    group.add_argument("--preprocess", metavar="NAME|FILE",
                       help="image folders need one: a preset (cifar10, imagenet, imagenet-32, raw; "
                            "`onnx-ocnna presets` describes them) or a JSON file; or give --mean/--std")
    group.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="per-channel mean on 0-1 pixels")
    group.add_argument("--std", type=_floats, metavar="S[,S,S]", help="per-channel std on 0-1 pixels")
    group.add_argument("--size", type=_ints, metavar="H,W", help="image size when the model's is dynamic")
    group.add_argument("--max-samples", type=_positive_int, metavar="N", help="use a seeded subset of N samples")
    group.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="batch size (default 32)")


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("importance")
    group.add_argument("--criterion", choices=CRITERIA_CHOICES,
                       help="importance criterion (default ocnna; group-l2 when the calibration data is "
                            "synthesized, which ranks channels better than OCNNA on synthetic images)")
    group.add_argument("--pca-variance", type=float, default=1.0, metavar="TAU",
                       help="ocnna: variance share the PCA keeps (default 1.0 = Frobenius norm of the centred "
                            "map, same ranking at a 10th of the cost; 0.95 = the paper-style truncated PCA)")
    group.add_argument("--invert", action="store_true", help="ocnna: keep high-CV filters instead of low-CV ones")
    group.add_argument("--seed", type=int, default=0, help="seed for random and for sample subsets (default 0)")


def _add_distill_options(group, flag: bool = True) -> None:
    if flag:
        group.add_argument("--distill", action="store_true", help="fine-tune the pruned model by distillation")
    group.add_argument("--train", metavar="DATA", help="training data (default: the calibration data)")
    group.add_argument("--train-samples", type=_positive_int, metavar="N",
                       help="train on a seeded class-balanced subset of N samples of --train (default: all)")
    group.add_argument("--epochs", type=_positive_int, default=3, help="distillation epochs (default 3)")
    group.add_argument("--lr", type=float, default=0.01, help="initial learning rate, cosine schedule (default 0.01)")
    group.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    group.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                       help="sgd (Nesterov momentum 0.9, the default) or adamw; --lr is its initial rate")
    group.add_argument("--bn", choices=["frozen", "recompute", "train"], default="train",
                       help="BatchNorm statistics: kept as they are (frozen), re-estimated on the training "
                            "data before distilling (recompute), or batch statistics while training, with folded "
                            "BatchNorms restored around each Conv and folded back (train, the default)")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of cross-entropy when labels exist (default 0.5)")
    group.add_argument("--no-augment", action="store_true", help="no random crop / horizontal flip")
    group.add_argument("--no-flip", action="store_true", help="random crop only (for digits, text, ...)")
    group.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="save a checkpoint after every epoch")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    group.add_argument("--threads", type=_positive_int, metavar="N",
                       help="CPU threads for distillation (default: the fastest count on the first steps, which "
                            "follows the machine's load; a fixed N makes a run repeatable bit for bit)")


def _add_selection_options(group) -> None:
    group.add_argument("--scope", choices=["per-group", "global"], default="per-group")
    group.add_argument("--min-channels", type=_positive_int, default=1, metavar="N")
    group.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                       help="keep a multiple of N channels in every tensor; 'auto' = ONNX Runtime's "
                            "channel block on this CPU (16 with AVX-512, else 8), for real speed-ups")
    group.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="leave groups whose Conv or weight name matches (repeatable)")


def _add_fc_options(group) -> None:
    group.add_argument("--fc-width", choices=["csi"],
                       help="size every hidden Gemm/MatMul layer by the centre-based Separation Index: the "
                            "smallest prefix of its greedy CSI order within --csi-tolerance of the whole "
                            "layer's CSI (needs labelled --calib); the other groups are selected as usual")
    group.add_argument("--csi-tolerance", type=float, default=0.01, metavar="T",
                       help="with --fc-width csi: keep neurons until CSI >= (1 - T) x the layer's (default 0.01)")


def _add_budget_options(group, many: bool = False) -> None:
    """The budget options; with ``many`` each takes a list of ratios (one sweep point each)."""
    kind, metavar, each = (_floats, "R,R,...", "one point per ratio: ") if many else (float, "R", "")
    group.add_argument("--target-params", type=kind, metavar=metavar,
                       help=f"{each}keep at most R of the parameters; widths per group from measured damage")
    group.add_argument("--target-macs", type=kind, metavar=metavar,
                       help=f"{each}keep at most R of the MACs; widths per group from measured damage")
    group.add_argument("--target-latency", type=kind, metavar=metavar,
                       help=f"{each}ONNX Runtime latency at most R of the original's, measured here "
                            "(--latency-batch, --latency-threads)")
    group.add_argument("--allocation", choices=["measured", "uniform"], default="measured",
                       help="how a target is spent: per-group widths from measured damage (default) or one "
                            "percentile for every group (the paper's setting)")
    group.add_argument("--latency-batch", type=_positive_int, default=1, metavar="B",
                       help="batch size --target-latency is measured at (default 1)")
    group.add_argument("--latency-threads", type=_positive_int, default=1, metavar="T",
                       help="intra-op threads --target-latency is measured with (default 1)")
    group.add_argument("--speed-floor", type=_speed_floor, metavar="F",
                       help="with --target-macs R the model must also measure at least F / R times as fast as "
                            "the original (--latency-batch, --latency-threads), or the budget is searched for "
                            "time too; 0: MACs alone (default 0.8)")
    group.add_argument("--damage-samples", type=_positive_int, metavar="N",
                       help="calibration images the allocation measures each candidate cut on (default 512, or all "
                            "when fewer; fewer, not below 64, when candidate cuts x images x the model's MACs "
                            "would pass 2.5e13, about 7 minutes here)")
    group.add_argument("--no-block-removal", dest="block_removal", action="store_false",
                       help="the allocation only narrows groups; by default removing a whole identity-shortcut "
                            "residual block is a candidate too")


def _add_reconstruct_options(parser) -> None:
    rec = parser.add_argument_group("reconstruction (least squares, no training)")
    rec.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                     help="refit every layer after a cut so its outputs match the original's on the calibration "
                          "data (on by default with --calib; --no-reconstruct turns it off)")
    rec.add_argument("--reconstruct-samples", type=_positive_int, metavar="N",
                     help="calibration samples the refit reads (default: all the data has, 512 to 2048, "
                          "fewer for larger models: 512 from about 500 MMACs per image, as a 224 x 224 ResNet)")


def _add_eval_options(group, help: str | None = None, samples_help: str | None = None,
                      required: bool = False) -> None:
    """``--eval DATA`` and ``--eval-samples N``: the held-out data of a subcommand."""
    group.add_argument("--eval", metavar="DATA", required=required, help=help)
    group.add_argument("--eval-samples", type=_positive_int, metavar="N", help=samples_help)


def _add_run_options(group, overwrite_help: str | None = None, quiet_help: str | None = None,
                     quiet: bool = True) -> None:
    """``--overwrite`` (replace an existing output) and ``--quiet`` (no progress bars)."""
    group.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if quiet:
        group.add_argument("--quiet", action="store_true", help=quiet_help)


def _compress_options(args) -> dict:
    """The selection, budget and recovery options shared by the main command and the sweep."""
    return {"scope": args.scope, "min_channels": args.min_channels, "round_to": args.round_to,
            "exclude": args.exclude, "allocation": args.allocation, "latency_batch": args.latency_batch,
            "latency_threads": args.latency_threads, "damage_samples": args.damage_samples,
            "block_removal": args.block_removal, "reconstruct": args.reconstruct,
            "reconstruct_options": {"samples": args.reconstruct_samples},
            "fc_width": args.fc_width, "csi_tolerance": args.csi_tolerance,
            # Unset: the library's own default floor (not repeated here, to keep numpy out of start-up).
            **({"speed_floor": args.speed_floor} if args.speed_floor is not None else {})}


def build_parser() -> dict[str, argparse.ArgumentParser]:
    main = _Parser(prog="onnx-ocnna", description="Prune the filters of a CNN in an ONNX model.",
                   epilog="subcommands: inspect, score, demo, distill, quantize, sweep, presets "
                          "(onnx-ocnna SUBCOMMAND --help)")
    main.add_argument("input", type=Path, help="input .onnx model")
    main.add_argument("output", type=Path, help="output .onnx model (never the input)")
    main.add_argument("--version", action="version", version=f"onnx-ocnna {__version__}")
    _add_calibration_options(main)
    syn = main.add_argument_group("synthesized calibration data (when no --calib is given)")
    syn.add_argument("--synthesize", type=_positive_int, metavar="N",
                     help="without --calib: N inputs optimised so that every BatchNorm's input statistics match its "
                          "running mean and variance (ZeroQ's distilled data; default 256, seeded by --seed)")
    syn.add_argument("--save-calib", type=Path, metavar="FILE.npz",
                     help="also write the synthesized inputs, keyed by input name (reusable as --calib FILE.npz)")
    _add_scoring_options(main)
    sel = main.add_argument_group("selection")
    sel.add_argument("--percentile", type=_percentile, default=40.0, metavar="K",
                     help="remove the K %% least important channels of each group (default 40)")
    _add_selection_options(sel)
    _add_fc_options(sel)
    _add_budget_options(sel)
    sel.add_argument("--max-drop", type=float, metavar="D",
                     help="the most compressed model at most D points below the original on --eval (top-1, "
                          "or agreement without labels): searches the budget along --objective, and INT8 with "
                          "--quantize auto; --eval must not be the calibration or training data")
    sel.add_argument("--objective", choices=["latency", "macs", "params", "size"], default="latency",
                     help="what --max-drop minimises (default latency, measured at --latency-batch/-threads)")
    sel.add_argument("--pareto", type=Path, metavar="pareto.png",
                     help="with --max-drop: plot every candidate's accuracy against the objective")
    sel.add_argument("--plot", type=Path, metavar="widths.png",
                     help="write a picture of every layer's width, original against pruned")
    sel.add_argument("--plan", type=Path, metavar="plan.json", help="apply this plan instead of scoring")
    sel.add_argument("--drop-blocks", action="store_true",
                     help="first remove residual blocks that do not raise the Separation Index (needs labels)")
    sel.add_argument("--si-epsilon", type=float, default=0.0, metavar="E",
                     help="a block must raise SI by more than E to stay (default 0)")
    _add_reconstruct_options(main)
    kd = main.add_argument_group("knowledge distillation (PyTorch; the original model teaches)")
    _add_distill_options(kd)
    out = main.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="report.json", help="write the report as JSON")
    out.add_argument("--save-plan", type=Path, metavar="plan.json", help="also write the plan that was applied")
    _add_eval_options(out, "held-out data: top-1 before/after (or agreement without labels)",
                      "evaluate on a seeded class-balanced subset of N held-out samples (default: all)")
    out.add_argument("--bench", action="store_true", help="measure ONNX Runtime latency before/after")
    out.add_argument("--quantize", choices=["int8", "auto"],
                     help="int8: write OUT as an INT8 (QDQ) model calibrated on --calib, the float pruned model "
                          "to OUT's name with .fp32.onnx; auto (with --max-drop): INT8 where it stays within D")
    _add_run_options(out, "replace OUTPUT if it exists", "no progress bars")

    inspect = _Parser(prog="onnx-ocnna inspect", description="Show channel groups, what is prunable and why not.")
    inspect.add_argument("input", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    score = _Parser(prog="onnx-ocnna score", description="Score every channel and write a plan (SPEC section 6).")
    score.add_argument("input", type=Path)
    score.add_argument("-o", "--output", type=Path, required=True, metavar="plan.json")
    _add_calibration_options(score)
    _add_scoring_options(score)
    score.add_argument("--percentile", type=_percentile, default=40.0, metavar="K")
    _add_selection_options(score)
    _add_run_options(score)
    quantize = _Parser(prog="onnx-ocnna quantize",
                       description="ONNX Runtime static INT8 quantization (QDQ, per-channel weights).")
    quantize.add_argument("input", type=Path)
    quantize.add_argument("output", type=Path)
    _add_calibration_options(quantize, required=True)
    quantize.add_argument("--seed", type=int, default=0)
    _add_eval_options(quantize, "held-out data: top-1 of float vs INT8")
    quantize.add_argument("--bench", action="store_true", help="measure ONNX Runtime latency float vs INT8")
    _add_run_options(quantize, quiet=False)
    distill = _Parser(prog="onnx-ocnna distill",
                      description="Distil an already pruned model; the original model is the teacher.")
    distill.add_argument("input", type=Path, help="pruned .onnx model (the student)")
    distill.add_argument("output", type=Path)
    distill.add_argument("--teacher", type=Path, required=True, help="the original .onnx model")
    _add_calibration_options(distill)
    _add_distill_options(distill, flag=False)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--report", type=Path, metavar="report.json",
                         help="write the run as JSON: files with SHA-256, settings, per-epoch history")
    _add_eval_options(distill)
    _add_run_options(distill)

    demo = _Parser(prog="onnx-ocnna demo",
                   description="Compress and distil the digits CNN shipped in the package (no network needed).")
    demo.add_argument("--percentile", type=_percentile, default=40.0)
    demo.add_argument("--epochs", type=_positive_int, default=20)
    demo.add_argument("--output", type=Path, metavar="OUT",
                      help="where the compressed model goes (default digits_cnn.ocnna.onnx here)")
    _add_run_options(demo, "replace OUT if it exists")
    presets = _Parser(prog="onnx-ocnna presets", description="The image preprocessing presets (--preprocess NAME).")
    sweep = _Parser(prog="onnx-ocnna sweep",
                    description="Accuracy and RPR against the percentile k (plot + CSV), scoring once.")
    sweep.add_argument("input", type=Path)
    sweep.add_argument("-o", "--output", type=Path, required=True, metavar="sweep.png",
                       help="the plot; the table goes beside it as .csv")
    _add_calibration_options(sweep)
    _add_scoring_options(sweep)
    _add_eval_options(sweep, "held-out data", required=True)
    sweep.add_argument("--percentiles", type=_floats, metavar="K,K,...",
                       help="one point per percentile (default 0,10,...,80 unless a --target-* list is given)")
    points = sweep.add_argument_group("selection, budgets and reconstruction, as in the main command")
    _add_selection_options(points)
    _add_fc_options(points)
    _add_budget_options(points, many=True)
    _add_reconstruct_options(sweep)
    sweep.add_argument("--distill", action="store_true", help="distil every pruned model")
    _add_distill_options(sweep, flag=False)
    _add_run_options(sweep)
    return {"main": main, "inspect": inspect, "score": score, "quantize": quantize, "distill": distill, "demo": demo,
            "sweep": sweep, "presets": presets}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_warnings_as_lines()
    # Where this run's entries in the record of written files begin (none before model_io loads).
    io = sys.modules.get("onnx_ocnna.model_io")
    before = len(io.written_files()) if io is not None else 0
    try:
        parsers = build_parser()
        command = argv[0] if argv and argv[0] in parsers and argv[0] != "main" else "main"
        args = parsers[command].parse_args(argv[1:] if command != "main" else argv)
        args.argv = argv  # as given, for the report (sys.argv is the caller's when main() is called)
        # None = not given: the main command's choice depends on whether its data is synthesized.
        args.criterion_given = getattr(args, "criterion", None) is not None
        if hasattr(args, "criterion") and not args.criterion_given:
            args.criterion = DEFAULT_CRITERION
        if command in ("main", "score", "distill"):
            from onnx_ocnna import distributed

            if distributed.launched():  # under torchrun: join the process group before any work
                distributed.init()
        runners = {"main": _run_main, "inspect": _run_inspect, "score": _run_score, "quantize": _run_quantize,
                   "distill": _run_distill, "demo": _run_demo, "sweep": _run_sweep, "presets": _run_presets}
        code = runners[command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # `onnx-ocnna inspect m.onnx | head -1`: the reader is gone; end quietly, as `cat` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OcnnaError as exc:
        print(f"onnx-ocnna: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"onnx-ocnna: interrupted; {_written_since(before)}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line, the traceback on request
        if os.environ.get("ONNX_OCNNA_DEBUG"):
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"onnx-ocnna: internal error: {type(exc).__name__}: {text} (set ONNX_OCNNA_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


def _show_warnings_as_lines() -> None:
    """Python warnings as one ``onnx-ocnna: warning: ...`` line each, without source locations.

    Only the format changes, so callers that record warnings (pytest, catch_warnings) still do.
    """
    import warnings

    warnings.formatwarning = lambda message, *rest, **kw: f"onnx-ocnna: warning: {message}\n"


def _run_presets(args) -> int:
    from onnx_ocnna.calibration import list_presets, load_preset

    for name in list_presets():
        preset = load_preset(name)
        values = [f"mean {preset['mean']}", f"std {preset['std']}"]
        for key in ("size", "resize", "crop", "layout"):
            if key in preset:
                values.append(f"{key} {list(preset[key]) if isinstance(preset[key], tuple) else preset[key]}")
        print(f"{name}: {preset['description']}\n    {', '.join(values)}")
    return 0


def _written_since(before: int) -> str:
    """What an interrupted run leaves behind, said truthfully: every output is written to a
    temporary file and renamed, so a file is there complete or not at all."""
    io = sys.modules.get("onnx_ocnna.model_io")  # not imported yet: nothing can have been written
    # A file staged and then renamed onto an output is in the record but no longer exists.
    done = [] if io is None else list(dict.fromkeys(p for p in io.written_files()[before:] if p.exists()))
    if not done:
        return "nothing was written"
    return f"only {', '.join(map(str, done))} {'was' if len(done) == 1 else 'were'} written"


def _primary() -> bool:
    """True unless this is a non-zero rank under torchrun (which must not write or print)."""
    from onnx_ocnna import distributed

    return distributed.is_primary()


def _calibration_options(args) -> dict:
    return {"preprocess": args.preprocess, "mean": args.mean, "std": args.std, "size": args.size,
            "max_samples": args.max_samples, "batch_size": args.batch_size, "seed": args.seed}


def _check_synthesis_options(args) -> bool:
    """Whether this run synthesizes its calibration data (no --calib, and something needs data),
    with --synthesize/--save-calib checked before any work."""
    from onnx_ocnna.criteria import get_criterion
    from onnx_ocnna.errors import InputError

    if args.calib is not None:
        for flag, value in (("--synthesize", args.synthesize), ("--save-calib", args.save_calib)):
            if value is not None:
                raise InputError(f"{flag} makes calibration data when none is given; "
                                 "it cannot be combined with --calib")
        return False
    if args.save_calib is not None and args.save_calib.suffix.lower() != ".npz":
        raise InputError(f"--save-calib writes a .npz file, got {args.save_calib}")
    if args.max_drop is not None:
        return False  # --max-drop says itself that it needs --calib and --eval
    asked = args.synthesize is not None or args.save_calib is not None
    scoring = args.plan is None
    targets = any(t is not None for t in (args.target_params, args.target_macs, args.target_latency))
    needs = [reason for reason, need in (
        (f"the {args.criterion} criterion", scoring and get_criterion(args.criterion).needs_data),
        ("the measured allocation of a target", scoring and targets and args.allocation == "measured"),
        ("--reconstruct", bool(args.reconstruct)),
        (f"--quantize {args.quantize}", bool(args.quantize)),
        ("--distill without --train", args.distill and not args.train)) if need]
    if not asked and not needs:
        return False  # a data-free run (a weight criterion, a plan): nothing to synthesize
    if (scoring and args.criterion == "si") or args.drop_blocks:
        raise InputError(f"{'--drop-blocks' if args.drop_blocks else '--criterion si'} needs labelled calibration "
                         "data and synthesized data has no labels: give --calib")
    from onnx_ocnna import distributed

    if distributed.launched():
        raise InputError("calibration data is not synthesized under torchrun (each process would make its own): "
                         "synthesize once with --save-calib FILE.npz, then pass --calib FILE.npz")
    args.synthesis_needed_by = needs
    return True


def _synthesize_calibration(args, model):
    """Synthesize the calibration set from ``model``'s BatchNorm statistics, say so, keep it if
    asked (--save-calib), and put it in ``args.calib`` as an opened source every stage reads."""
    from onnx_ocnna import api
    from onnx_ocnna.errors import InputError
    from onnx_ocnna.synthesize import NoBatchNormError, save_npz, synthesize

    try:
        synthesis = synthesize(model, args.synthesize or 256, seed=args.seed, size=args.size,
                               progress=not args.quiet)
    except NoBatchNormError:
        needs = ", ".join(args.synthesis_needed_by) or "--synthesize"
        data_free = " or a data-free criterion (--criterion group-l2)" if "criterion" in needs else ""
        raise InputError(f"{args.input} has no BatchNormalization statistics (folded into the Convs by the exporter) "
                         f"to synthesize calibration data from; {needs} needs real data: give --calib DATA"
                         f"{data_free}") from None
    if args.save_calib is not None:
        save_npz(synthesis, args.save_calib)
    print(f"onnx-ocnna: note: no --calib: the calibration data is SYNTHETIC, {synthesis.samples} inputs optimised "
          f"in {synthesis.seconds:.1f} s to match the statistics of {synthesis.bn_layers} BatchNorm layers "
          f"(loss {synthesis.match_ratio:.3f} x Gaussian noise's)"
          + (f"; saved to {args.save_calib}" if args.save_calib is not None else ""), file=sys.stderr)
    args.calib = api.as_source(synthesis.arrays, model, batch_size=args.batch_size, seed=args.seed)
    if not args.calib.num_samples:  # pragma: no cover - synthesize makes at least one sample
        raise InputError("no calibration data was synthesized")
    from onnx_ocnna.criteria.ocnna import DEFAULT_PCA_VARIANCE

    ocnna_options_given = args.invert or args.pca_variance != DEFAULT_PCA_VARIANCE
    if not args.criterion_given and not ocnna_options_given and args.plan is None:
        args.criterion = SYNTHETIC_DATA_CRITERION
        print(f"onnx-ocnna: note: channels ranked by {SYNTHETIC_DATA_CRITERION} (their weights), which measured "
              f"better than {DEFAULT_CRITERION} on synthetic images; the synthetic data serves the allocation and "
              f"the reconstruction (--criterion {DEFAULT_CRITERION} to rank on it)", file=sys.stderr)
    return synthesis


def _record_synthesis(report, synthesis, criterion: str | None) -> None:
    """The report says that the calibration data is synthetic (``calibration.synthetic``) and,
    for a weight criterion (``criterion``; None: no scoring), that it did not rank the channels."""
    from onnx_ocnna.criteria import get_criterion

    report.calibration = {**(report.calibration or {}), "source": "synthesized", "kind": "synthetic",
                          "samples": synthesis.samples, "labels": False, "synthetic": synthesis.describe()}
    report.timings["synthesize_s"] = synthesis.seconds
    report.notes.insert(0, f"the calibration data is synthetic: {synthesis.samples} inputs made from the model's "
                           f"BatchNorm statistics (ZeroQ), no real data was seen"
                           + ("" if criterion is None or get_criterion(criterion).needs_data else
                              f"; channels ranked by {criterion} (weights only), not on the synthetic data"))


def _eval_source(args, model):
    """Held-out data, read like the calibration data but with its own sample limit."""
    from onnx_ocnna import api

    options = {**_calibration_options(args), "max_samples": getattr(args, "eval_samples", None)}
    return api.as_source(args.eval, model, **options)


def _criterion_options(args) -> dict:
    if args.criterion == "ocnna":
        return {"pca_variance": args.pca_variance, "invert": args.invert}
    if args.criterion == "random":
        return {"seed": args.seed}
    return {}


def _check_output(args, path: Path) -> None:
    from onnx_ocnna.errors import InputError
    from onnx_ocnna.model_io import check_output_path

    check_output_path(args.input, path)
    if path.exists() and not args.overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")


def _files_read(args) -> tuple[tuple[str, Path], ...]:
    """(option, path) of the existing files a command reads besides its input model: data given
    as one file (.npz, .npy), a plan, a teacher."""
    options = (("--calib", "calib"), ("--train", "train"), ("--eval", "eval"), ("--plan", "plan"),
               ("--teacher", "teacher"))
    found = ((option, getattr(args, attr, None)) for option, attr in options)
    return tuple((option, Path(value)) for option, value in found
                 if isinstance(value, (str, Path)) and Path(value).is_file())


def _check_outputs(args, named: list[tuple[str, Path | None]], read: tuple[tuple[str, Path], ...] = ()) -> None:
    """Every output a command writes passes :func:`_check_output`, and no two name the same file: each is
    written in turn, so ``--report out.onnx`` would replace the model just written with JSON.

    ``named`` holds (what the user calls it, path) pairs; a path of None is not written. ``read`` names
    files the command reads besides ``args.input`` (:func:`_files_read`), which no output may replace."""
    from onnx_ocnna.errors import InputError

    inputs = {Path(path).resolve(): name for name, path in read}
    seen: dict[Path, str] = {}
    for name, path in named:
        if path is None:
            continue
        key = path.resolve()
        if key in inputs:  # before _check_output, whose "exists" would hide why
            raise InputError(f"{name} {path} is {inputs[key]}, which this command reads; choose another file name")
        _check_output(args, path)
        first = seen.setdefault(key, name)
        if first != name:
            raise InputError(f"{name} {path} is the same file as {first}; give each output its own file name")


def _run_main(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.model_io import save_model, uses_external_data
    from onnx_ocnna.plan import load_plan, save_plan

    fp32_path = args.output.with_name(args.output.stem + ".fp32.onnx") if args.quantize else None
    _check_outputs(args, [("the output", args.output), ("--report", args.report), ("--save-plan", args.save_plan),
                          ("the FP32 copy", fp32_path), ("--plot", getattr(args, "plot", None)),
                          ("--save-calib", args.save_calib)], read=_files_read(args))
    synthesizing = _check_synthesis_options(args)
    if args.quantize and not args.calib and not synthesizing:
        from onnx_ocnna.errors import InputError

        raise InputError(f"--quantize {args.quantize} needs calibration data (--calib)")
    _check_search_options(args)
    if args.plan is not None and args.reconstruct:  # None (the default) means "on when possible"
        from onnx_ocnna.errors import InputError

        raise InputError("--reconstruct refits after scoring; it cannot be combined with --plan")
    targets = (args.target_params, args.target_macs, args.target_latency)
    _check_speed_floor(args, args.target_macs is not None or (args.max_drop is not None and args.objective == "macs"),
                       "--target-macs R (or --max-drop with --objective macs)")
    if (args.plan is None and args.percentile == 0 and all(t is None for t in targets) and not args.drop_blocks
            and not args.quantize and not args.distill and not args.fc_width):
        from onnx_ocnna.errors import InputError

        # Said before loading and scoring: k = 0 removes nothing, and scoring can take minutes.
        raise InputError("--percentile 0 removes no channel and nothing else is asked; give a percentile "
                         "above 0 or a budget (--target-params/--target-macs/--target-latency)")
    started = time.perf_counter()
    spent: dict[str, float] = {}  # stage seconds before the report exists
    with _timed(spent, "load_s"):
        model = api.as_model(args.input)
    synthetic = _synthesize_calibration(args, model) if synthesizing else None
    if args.distill and args.alpha > 0:  # synthesized data has no labels and passes
        kd_options = _distill_options(args)
        api.check_training_labels(model, kd_options["train"], kd_options["calibration_options"])
    if args.eval and args.eval != args.calib:  # the calibration data is checked by compress
        eval_options = {**_calibration_options(args), "max_samples": args.eval_samples}
        api.check_preprocessing(model, args.eval, eval_options, "the --eval data")
    held_out = None
    if args.eval and _primary():  # under torchrun only rank 0 evaluates
        from onnx_ocnna.evaluate import HeldOut

        # The original's predictions, once: each stage (pruned, reconstructed, distilled, INT8) is
        # measured against them.
        with _timed(spent, "evaluate_s"):
            held_out = HeldOut(model, _eval_source(args, model).batches)
    if args.max_drop is not None:
        return _run_max_drop(args, model, held_out, spent, started)
    if args.plan is not None:
        pruned, report = api.apply_plan(model, load_plan(args.plan))
    else:
        pruned, report = api.compress(
            model, args.calib, percentile=args.percentile, criterion=args.criterion,
            target_params=args.target_params, target_macs=args.target_macs, target_latency=args.target_latency,
            criterion_options=_criterion_options(args), calibration_options=_calibration_options(args),
            progress=not args.quiet, drop_blocks=args.drop_blocks, si_epsilon=args.si_epsilon,
            eval_data=held_out, **_compress_options(args))
    timings = report.timings = {key: spent.get(key, 0.0) + report.timings.get(key, 0.0)
                                for key in {**spent, **report.timings}}
    if synthetic is not None:
        _record_synthesis(report, synthetic, args.criterion if args.plan is None else None)
    if held_out is not None and report.accuracy is None:  # a plan, or nothing was prunable
        with _timed(timings, "evaluate_s"):
            report.record_accuracy("pruned", held_out.measure(pruned))
    if args.distill:
        with _timed(timings, "distill_s"):
            pruned, kd = _distill(args, pruned, model)
        report.extra["distillation"] = {**kd.to_dict(),
                                        "train_data": args.train or ("synthesized" if synthetic else args.calib)}
        if held_out is not None:
            with _timed(timings, "evaluate_s"):
                report.record_accuracy("distilled", held_out.measure(pruned))
    if not _primary():
        return 0  # under torchrun only rank 0 evaluates and writes
    if args.bench:
        from onnx_ocnna.evaluate import compare_latency

        with _timed(timings, "bench_s"):
            # A dynamic input height and width are timed at the calibration data's size, not 1 x 1.
            sizes = api._sample_shapes(args.calib, model, _calibration_options(args)) if args.calib else None
            # Batch 1 and 32 at one thread, and the batch and threads a latency target is timed at.
            report.latency = compare_latency(model, pruned, batches=sorted({1, 32, args.latency_batch}),
                                             threads=sorted({1, args.latency_threads}), sizes=sizes)
    external = uses_external_data(args.input) or None
    if args.quantize:
        _quantize_into(args, model, pruned, fp32_path, report, external, held_out)
    else:
        with _timed(timings, "write_s"):
            save_model(pruned, args.output, external_data=external)
    if args.save_plan is not None and "plan" in report.extra:
        with _timed(timings, "write_s"):
            save_plan(report.extra["plan"], args.save_plan)
    if held_out is not None:
        report.accuracy["data"] = args.eval
    timings["total_s"] = time.perf_counter() - started
    if args.report is not None:
        _describe_run(args, report, fp32_path)
        report.save(args.report)
    if getattr(args, "plot", None) is not None and report.extra.get("widths"):
        from onnx_ocnna.report import plot_widths

        plot_widths(report, args.plot)
    print(report.table())
    for block in report.extra.get("blocks", []):
        print(f"block {block['add']}: SI {block['si_in']:.4f} -> {block['si_out']:.4f}"
              f"{'  removed' if block['dropped'] else ''}")
    if args.quantize:
        print(_quantized_table(report.extra["int8"]))
        print(f"wrote {fp32_path} (float) and {args.output} (INT8)")
    else:
        print(f"wrote {args.output}")
    return 0


def _check_search_options(args) -> None:
    """--max-drop's requirements, said before any work."""
    from onnx_ocnna.errors import InputError
    from onnx_ocnna.search import same_data

    if args.max_drop is None:
        if args.quantize == "auto":
            raise InputError("--quantize auto chooses INT8 where it stays within --max-drop D; give --max-drop "
                             "(or --quantize int8 to always quantize)")
        if args.pareto is not None:
            raise InputError("--pareto plots the candidates of a --max-drop search; give --max-drop")
        return
    if not args.max_drop > 0:
        raise InputError(f"--max-drop must be a positive number of points, got {args.max_drop:g}")
    from onnx_ocnna import distributed

    if distributed.launched():
        raise InputError("--max-drop runs its search in one process; start it without torchrun")
    if not args.eval or not args.calib:
        raise InputError("--max-drop measures every candidate on held-out data: give --calib and --eval")
    given = [f"--target-{o}" for o in ("params", "macs", "latency") if getattr(args, f"target_{o.replace('-', '_')}")]
    if given or args.plan is not None or args.drop_blocks:
        raise InputError(f"--max-drop searches the budget itself; it cannot be combined with "
                         f"{(given + (['--plan'] if args.plan else []) + (['--drop-blocks'] if args.drop_blocks else []))[0]}")
    for flag, other in (("--calib", args.calib), ("--train", args.train)):
        if other is not None and same_data(args.eval, other):
            raise InputError(f"--eval {args.eval} and {flag} {other} name the same files: the accepted drop must be "
                             "measured on data the model was not calibrated or trained on")


def _run_max_drop(args, model, held_out, spent: dict, started: float) -> int:
    """``--max-drop D``: search, write the chosen candidate, print the study's table."""
    import shutil
    import tempfile

    from onnx_ocnna.model_io import atomic_output, load_model, save_model, uses_external_data
    from onnx_ocnna.search import candidates_table, most_compressed, plot_pareto

    distill_options = _distill_options(args) if args.distill else None
    with tempfile.TemporaryDirectory(prefix="ocnna-search-") as work:
        with _timed(spent, "search_s"):
            result = most_compressed(
                model, args.calib, held_out, args.max_drop, objective=args.objective,
                quantize="auto" if args.quantize == "auto" else "none", criterion=args.criterion,
                criterion_options=_criterion_options(args), calibration_options=_calibration_options(args),
                compress_options=_compress_options(args), distill_options=distill_options,
                latency_batch=args.latency_batch, latency_threads=args.latency_threads, work_dir=work,
                progress=not args.quiet)
        chosen = result.chosen
        report = chosen.report
        if report is None:  # the original, quantized: no pruning report exists
            from onnx_ocnna.metrics import model_stats
            from onnx_ocnna.report import Report

            report = Report(model_stats(model), model_stats(model), notes=["INT8 of the unpruned model"])
        # The run's stages are loading, the search (every candidate's scoring, allocation, refit
        # and measurement) and writing; the chosen candidate's own steps are in its search row.
        report.timings = dict(spent)
        report.extra["search"] = result.as_dict()
        # The table's held-out rows: the chosen float model at the last recovery step, then INT8.
        stage = ("distilled" if args.distill else "reconstructed" if report.settings.get("reconstruct")
                 else "pruned")
        with _timed(report.timings, "evaluate_s"):
            if chosen.report is not None:
                report.record_accuracy(stage, held_out.measure(chosen.model))
            if chosen.int8:
                report.record_accuracy("int8", held_out.measure(load_model(chosen.path)), current=chosen.report is None)
        if chosen.int8:
            report.notes.append(f"written as INT8 (QDQ): {chosen.size_bytes / 1024:.1f} KiB, {chosen.size_ratio:.3f} "
                                "of the original's file; the float model above goes beside it")
        external = uses_external_data(args.input) or None
        fp32_path = None
        with _timed(report.timings, "write_s"):
            if chosen.int8:
                fp32_path = args.output.with_name(args.output.stem + ".fp32.onnx")
                save_model(chosen.model, fp32_path, external_data=external)
                with atomic_output(args.output) as staged:
                    shutil.copyfile(chosen.path, staged)
            else:
                save_model(chosen.model, args.output, external_data=external)
    if args.pareto is not None:
        top = held_out.measure(model)
        original = 100 * (top.top1_before if result.labelled else 1.0)
        plot_pareto(result, args.pareto, original)
    report.timings["total_s"] = time.perf_counter() - started
    if args.report is not None:
        _describe_run(args, report, fp32_path)
        report.save(args.report)
    print(report.table())
    print(candidates_table(result))
    print(f"wrote {fp32_path} (float) and {args.output} (INT8)" if chosen.int8 else f"wrote {args.output}")
    return 0


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[key]`` (a stage can run in several pieces)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _describe_run(args, report, fp32_path: Path | None) -> None:
    """The command, and the input and written files with their hashes, into the report."""
    from onnx_ocnna.report import file_record

    report.command = ["onnx-ocnna", *args.argv]
    report.input = file_record(args.input)
    report.output = file_record(args.output)
    if fp32_path is not None:  # --quantize: OUT is the INT8 model, the float one sits beside it
        report.output["format"] = "int8"
        report.output["float"] = file_record(fp32_path)


def _distill(args, student, teacher):
    from onnx_ocnna import api

    return api.distill(student, teacher, **_distill_options(args))


def _distill_options(args) -> dict:
    """Keyword arguments of :func:`api.distill` (training data included) from the options."""
    from onnx_ocnna.errors import InputError

    train = args.train or args.calib
    if train is None:
        raise InputError("distillation needs training data (--train or --calib)")
    if args.resume and args.checkpoint_dir is None:
        raise InputError("--resume needs --checkpoint-dir (where the checkpoint is)")
    options = _calibration_options(args)
    if args.train:
        options["max_samples"] = args.train_samples
    eval_options = {**_calibration_options(args), "max_samples": args.eval_samples}
    return dict(train=train, epochs=args.epochs, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                augment=not args.no_augment, hflip=not args.no_flip, eval_data=args.eval,
                calibration_options=options, eval_options=eval_options, progress=not args.quiet, seed=args.seed,
                checkpoint_dir=args.checkpoint_dir, resume=args.resume, optimizer=args.optimizer, bn=args.bn,
                threads=args.threads)


def _run_distill(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.metrics import model_stats
    from onnx_ocnna.model_io import save_model, uses_external_data

    _check_outputs(args, [("the output", args.output), ("--report", args.report)], read=_files_read(args))
    started = time.perf_counter()
    student, teacher = api.as_model(args.input), api.as_model(args.teacher)
    if model_stats(student).parameters > model_stats(teacher).parameters:
        print("onnx-ocnna: note: the student has more parameters than the teacher", file=sys.stderr)
    distilled, kd = _distill(args, student, teacher)
    if not _primary():
        return 0
    save_model(distilled, args.output, external_data=uses_external_data(args.input) or None)
    if args.report is not None:
        from onnx_ocnna.jsonio import write_json
        from onnx_ocnna.report import file_record, versions

        write_json(args.report, {
            "schema_version": 1, "kind": "distill", "command": ["onnx-ocnna", *args.argv],
            "versions": versions(), "input": file_record(args.input), "teacher": file_record(args.teacher),
            "output": file_record(args.output), "train_data": args.train or args.calib, "eval_data": args.eval,
            "distillation": kd.to_dict(), "total_s": time.perf_counter() - started})
    for epoch in kd.epochs:
        acc = f", held-out top-1 {100 * epoch.eval_accuracy:.2f} %" if epoch.eval_accuracy is not None else ""
        agree = f", agreement {100 * epoch.eval_agreement:.2f} %" if epoch.eval_agreement is not None else ""
        print(f"epoch {epoch.epoch}: loss {epoch.loss:.4f}{agree}{acc} ({epoch.seconds:.1f} s)")
    print(f"wrote {args.output}")
    return 0


def _run_sweep(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.sweep import run_sweep

    csv_path = args.output.with_suffix(".csv")
    _check_outputs(args, [("-o", args.output), ("the table written beside the plot", csv_path)],
                   read=_files_read(args))
    model = api.as_model(args.input)
    distill_options = {"lr": args.lr, "temperature": args.temperature, "alpha": args.alpha,
                       "augment": not args.no_augment, "hflip": not args.no_flip, "optimizer": args.optimizer,
                       "bn": args.bn}
    lists = {o: getattr(args, f"target_{o}") for o in ("params", "macs", "latency")
             if getattr(args, f"target_{o}") is not None}
    if len(lists) > 1 or (lists and args.percentiles is not None):
        from onnx_ocnna.errors import InputError

        raise InputError("a sweep runs along one axis: --percentiles or one --target-* list")
    _check_speed_floor(args, "macs" in lists, "--target-macs R,...")
    targets = next(iter(lists.items())) if lists else None
    percentiles = None if targets else args.percentiles or [float(k) for k in range(0, 90, 10)]
    rows = run_sweep(model, args.calib, args.eval, percentiles, targets=targets, criterion=args.criterion,
                     compress_options=_compress_options(args),
                     criterion_options=_criterion_options(args), distill_epochs=args.epochs if args.distill else 0,
                     train_data=args.train, distill_options=distill_options,
                     calibration_options=_calibration_options(args),
                     eval_options={**_calibration_options(args), "max_samples": args.eval_samples},
                     out_png=args.output, out_csv=csv_path, progress=not args.quiet)
    labelled = bool(rows) and rows[0].get("top1_after") is not None
    columns = ["top1_after", "top1_distilled"] if labelled else ["agreement", "agreement_distilled"]
    axis = f"{targets[0]} target" if targets else "k"
    titles = {"top1_after": "top-1", "top1_distilled": "top-1 distilled", "agreement": "agreement",
              "agreement_distilled": "agreement distilled"}
    print(f"{axis:>14}  {'RPR':>6}  {'MACs':>6}  " + "  ".join(f"{titles[c]:>19}" for c in columns))
    for row in rows:
        cells = ["-" if row.get(c) is None else f"{100 * row[c]:.2f} %" for c in columns]
        point = row["target"] if targets else row["percentile"]
        print(f"{point:>14g}  {row['rpr']:>6.3f}  {row['macs_ratio']:>6.3f}  "
              + "  ".join(f"{cell:>19}" for cell in cells))
    print(f"wrote {args.output} and {csv_path}")
    return 0


def _run_demo(args) -> int:
    from onnx_ocnna.demo import run_demo

    output = {"output": args.output} if args.output is not None else {}
    print(run_demo(percentile=args.percentile, epochs=args.epochs, overwrite=args.overwrite, progress=not args.quiet,
                   **output))
    return 0


def _quantize_into(args, model, pruned, fp32_path: Path, report, external, held_out) -> None:
    """Quantize the float pruned model into OUT, measure both, and only then write the float
    model and OUT: a Ctrl-C while calibrating or measuring leaves neither."""
    from onnx_ocnna import api
    from onnx_ocnna.model_io import atomic_output, load_model, save_model
    from onnx_ocnna.quantize import quantize_int8

    measured = {}
    with atomic_output(args.output) as staged:
        with _timed(report.timings, "quantize_s"):
            source = api.as_source(args.calib, model, **_calibration_options(args))
            quantize_int8(pruned, source, staged)
        int8 = load_model(staged)
        if held_out is not None:
            with _timed(report.timings, "evaluate_s"):
                accuracy = held_out.measure(int8)
            measured["accuracy"] = accuracy.as_dict()
            report.record_accuracy("int8", accuracy, current=False)  # the table's stage rows show it
        if args.bench:
            from onnx_ocnna.evaluate import compare_latency

            with _timed(report.timings, "bench_s"):
                measured["latency"] = compare_latency(pruned, int8)
        with _timed(report.timings, "write_s"):
            save_model(pruned, fp32_path, external_data=external)
        info = {"fp32_bytes": fp32_path.stat().st_size, "int8_bytes": staged.stat().st_size}
    info["size_ratio"] = info["int8_bytes"] / info["fp32_bytes"]
    report.extra["int8"] = {**info, **measured}


def _quantized_table(info: dict) -> str:
    lines = [f"INT8 (QDQ): file {info['int8_bytes'] / 1024:.1f} KiB = {info['size_ratio']:.3f} x the float pruned file"]
    for row in info.get("latency", []):
        lines.append(f"latency b{row['batch']} t{row['threads']}: float pruned {row['before_ms']:.2f} ms, "
                     f"INT8 {row['after_ms']:.2f} ms ({row['speedup']:.2f}x)")
    return "\n".join(lines)


def _run_quantize(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.model_io import atomic_output, load_model
    from onnx_ocnna.quantize import quantize_int8

    _check_outputs(args, [("the output", args.output)], read=_files_read(args))
    model = api.as_model(args.input)
    source = api.as_source(args.calib, model, **_calibration_options(args))
    lines = []
    # Staged until the measurements are done, so that a Ctrl-C during them leaves no output.
    with atomic_output(args.output) as staged:
        quantize_int8(args.input, source, staged)
        int8 = load_model(staged)
        before, after = args.input.stat().st_size, staged.stat().st_size
        lines.append(f"INT8 (QDQ) model: {after / 1024:.1f} KiB, {after / before:.3f} x the input file")
        if args.eval:
            from onnx_ocnna.evaluate import compare_accuracy

            acc = compare_accuracy(model, int8, _eval_source(args, model).batches)
            if acc.top1_before is not None:
                lines.append(f"top-1: float {100 * acc.top1_before:.2f} %, INT8 {100 * acc.top1_after:.2f} %")
            lines.append(f"agreement with the float model: {100 * acc.agreement:.2f} % (n={acc.samples})")
        if args.bench:
            from onnx_ocnna.evaluate import compare_latency

            for row in compare_latency(model, int8):
                lines.append(f"latency b{row['batch']} t{row['threads']}: float {row['before_ms']:.2f} ms, "
                             f"INT8 {row['after_ms']:.2f} ms ({row['speedup']:.2f}x)")
    print("\n".join(lines))
    print(f"wrote {args.output}")
    return 0


def _run_inspect(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.jsonio import dumps

    info = api.inspect(args.input)
    if args.json:
        print(dumps(info))
        return 0
    stats = info["stats"]
    print(f"{args.input}: opset {info['opset']}, {stats['nodes']} nodes, {stats['parameters']:,} parameters, "
          f"{stats['macs']:,} MACs (batch 1)")
    print(f"{'group':>5}  {'channels':>8}  {'members':>7}  status")
    for group in info["groups"]:
        status = "prunable" if group["prunable"] else f"frozen: {group['frozen']}"
        if group["prunable"] and group["frozen"]:
            status += f" (some channels frozen: {group['frozen']})"
        first = group["members"][0] + (f" +{len(group['members']) - 1}" if len(group["members"]) > 1 else "")
        print(f"{group['id']:>5}  {group['channels']:>8}  {len(group['members']):>7}  {status}  [{first}]")
    prunable = sum(g["prunable"] for g in info["groups"])
    print(f"{prunable} of {len(info['groups'])} groups prunable, {info['prunable_channels']} removable channels")
    if info["batch_1"] is not None:
        print("the model fixes its batch size at 1: "
              + ("its passes run on whole batches through a copy checked to compute the same per image; "
                 "the files written stay at batch 1" if info["batch_1"]["whole_batches"] else
                 "no copy taking whole batches computes the same, so its passes run one image at a time"))
    if info["quantized"]:
        print(f"the model is quantized ({', '.join(info['quantized'])} nodes): filters read through them "
              "cannot be cut; prune the float model and quantize the result (--quantize int8)")
    return 0


def _run_score(args) -> int:
    from onnx_ocnna import api
    from onnx_ocnna.plan import build_plan, save_plan
    from onnx_ocnna.select import SelectionOptions, select

    _check_outputs(args, [("the output", args.output)], read=_files_read(args))
    model = api.as_model(args.input)
    pruner = api.Pruner(model)
    scores = api.score(model, args.calib, criterion=args.criterion, criterion_options=_criterion_options(args),
                       calibration_options=_calibration_options(args), progress=not args.quiet, pruner=pruner)
    options = SelectionOptions(percentile=args.percentile, scope=args.scope, min_channels=args.min_channels,
                               round_to=args.round_to, exclude=pruner.analysis.excluded(args.exclude))
    removed = select(pruner.analysis, scores.groups, options)
    if not _primary():
        return 0
    plan = build_plan(pruner.analysis, removed, pruner.sha256, scores.groups,
                      extra={"criterion": args.criterion, "percentile": args.percentile,
                             "calibration_samples": scores.samples})
    save_plan(plan, args.output)
    removed_count = sum(len(v) for v in removed.values())
    print(f"scored {sum(g.prunable for g in pruner.analysis.groups)} groups on {scores.samples} samples "
          f"in {scores.seconds:.1f} s; the plan removes {removed_count} channels at k = {args.percentile:g}")
    print(f"wrote {args.output}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 100), got {text!r}") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 100), got {text!r}")
    return value


def _round_to(text: str) -> int:
    from onnx_ocnna.select import ort_block_size

    return ort_block_size() if text.strip().lower() == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _check_speed_floor(args, macs_budget: bool, how: str) -> None:
    """Refuse --speed-floor without a MACs budget (``how`` says how to give one): silently
    ignored, it would look like a promise the written model does not keep."""
    if args.speed_floor is not None and not macs_budget:
        from onnx_ocnna.errors import InputError

        raise InputError(f"--speed-floor applies to a MACs budget only: {how}")


def _speed_floor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
