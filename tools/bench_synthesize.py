"""Synthesized calibration data against real images, same budget (issue 18).

For each BN-kept CIFAR-10 ResNet of ../shared/data: 256 inputs are synthesized from the model's
BatchNorm statistics (``onnx_ocnna.synthesize``, the defaults of ``onnx-ocnna IN OUT`` without
``--calib``), and the model is compressed at each MACs target with the shipped recipe
(``compress(target_macs=R)``: OCNNA scores, measured allocation, reconstruction) once on the
synthesized set and once on 512 real class-balanced training images. Every pruned model is
evaluated on the same held-out test images without training, then after the harness's KD budget
(``api.distill``: 1 epoch over 5,000 class-balanced real training images, bn="train", as
``tools/bench/run.py``'s ``measure_row``). The synthesis time, the BN-statistics loss of the
synthesized set, of Gaussian noise and of 256 real images are recorded too.

Results go to ``docs/results/synthesize_<model>.json`` after every row; ``--resume`` skips rows
already there (the synthesized set and the pruned models are kept in ``--work``).

    python tools/bench_synthesize.py --models resnet20-bn,resnet56-bn --targets 0.7,0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import REPO, SHARED, calib_and_test, cifar_subset, load_arrays, model_path, top1, write_json  # noqa: E402


def synthesized(model, key: str, args, results: dict, path: Path) -> dict:
    """The synthesized set of ``model`` (made once, kept in --work), its record in ``results``."""
    import numpy as np

    from onnx_ocnna.synthesize import synthesize

    keep = args.work / f"{key}_synthetic_{args.samples}_seed{args.seed}{_variant(args)}.npz"
    if keep.exists() and "synthesis" in results:
        with np.load(keep) as data:
            return {k: data[k] for k in data.files}
    synthesis = synthesize(model, args.samples, seed=args.seed, progress=False, **_settings(args))
    keep.parent.mkdir(parents=True, exist_ok=True)
    np.savez(keep, **synthesis.arrays)
    record = synthesis.describe()
    record["load_average"] = os.getloadavg()
    results["synthesis"] = record
    write_json(path, results)
    print(key, "synthesis", {k: record[k] for k in ("seconds", "bn_loss", "noise_loss", "match_ratio")}, flush=True)
    return synthesis.arrays


# synthesize() keyword the command line may set -> its label in the results' file names
SETTING_LABELS = {"class_weight": "class", "iterations": "it"}


def _settings(args) -> dict:
    """The synthesize() keywords the command line sets (the rest: the library's defaults)."""
    return {k: getattr(args, k) for k in SETTING_LABELS if getattr(args, k) is not None}


def _variant(args) -> str:
    """File-name suffix of the non-default synthesis settings ("" for the library's defaults)."""
    return "".join(f"_{SETTING_LABELS[k]}{v:g}" for k, v in _settings(args).items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20-bn,resnet56-bn")
    parser.add_argument("--targets", default="0.7,0.5", help="MACs ratios")
    parser.add_argument("--samples", type=int, default=256, help="synthesized inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=512, help="real calibration images")
    parser.add_argument("--test", type=int, default=5000)
    parser.add_argument("--train", type=int, default=5000, help="real training images for the KD rows")
    parser.add_argument("--kd-epochs", type=int, default=1, help="0: no KD rows")
    parser.add_argument("--class-weight", type=float, default=None,
                        help="synthesize(class_weight=W); default: the library's; results go to *_class<W>.json")
    parser.add_argument("--iterations", type=int, default=None,
                        help="synthesize(iterations=N); default: the library's; results go to *_it<N>.json")
    parser.add_argument("--kinds", default="synthetic,real", help="which calibration sets to compress with")
    parser.add_argument("--scores-from", choices=["own", "real", "group-l2"], default="own",
                        help="channel scores of every row: 'own' (OCNNA on the row's own calibration set, the "
                             "product's behaviour), 'real' (OCNNA on the real images, for every row), 'group-l2' "
                             "(the data-free criterion); the allocation and reconstruction always use the row's "
                             "own set. Not 'own': results go to *_scores-<FROM>.json")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ocnna_bench_synthesize"))
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"needs {SHARED} (the shared CIFAR-10 data)", file=sys.stderr)
        return 2
    import onnx

    from onnx_ocnna import api
    from onnx_ocnna.synthesize import bn_statistics_loss

    cache = Path(os.environ.get("OCNNA_BENCH_CACHE", "/tmp/ocnna_bench_cache"))  # the KD rows' training images
    real, test = calib_and_test(args.calib, args.test)
    targets = [float(t) for t in args.targets.split(",")]
    for key in args.models.split(","):
        scored = "" if args.scores_from == "own" else f"_scores-{args.scores_from}"
        path = args.out / f"synthesize_{key}{_variant(args)}{scored}.json"
        results = json.loads(path.read_text()) if args.resume and path.exists() else {}
        model = onnx.load(model_path(key))
        base, _ = top1(model, test)
        results["meta"] = {"model": key, "top1": base, "calib_real": args.calib, "synthesized": args.samples,
                           "test": args.test, "train": args.train, "kd_epochs": args.kd_epochs,
                           "scores_from": args.scores_from, **_settings(args),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(path, results)
        data = {"synthetic": synthesized(model, key, args, results, path), "real": real}
        if "real_bn_loss" not in results:  # how far real images are from the BN statistics, same measure
            results["real_bn_loss"] = bn_statistics_loss(model, {"input": real["input"][:args.samples]})
            write_json(path, results)
        scores = {}
        for kd in ([False, True] if args.kd_epochs else [False]):
            for target in targets:
                for kind in args.kinds.split(","):
                    name = f"{kind} @ macs:{target}{' + KD' if kd else ''}"
                    if name in results:
                        continue
                    kept = args.work / (f"{key}_{kind}{_variant(args) if kind == 'synthetic' else ''}{scored}"
                                        f"_macs{target}.onnx")
                    row = {"data": kind, "target_macs": target, "kd": kd}
                    try:
                        start = time.perf_counter()
                        if not kd:
                            scored_on = kind if args.scores_from == "own" else args.scores_from
                            if scored_on not in scores:
                                criterion = "group-l2" if scored_on == "group-l2" else "ocnna"
                                scores[scored_on] = api.score(model, data.get(scored_on), criterion=criterion,
                                                              progress=False)
                                row["score_s"] = scores[scored_on].seconds
                            pruned, report = api.compress(model, data[kind], scores=scores[scored_on],
                                                          criterion=scores[scored_on].criterion, progress=False,
                                                          target_macs=target)
                            onnx.save(pruned, str(kept))
                            row.update(rpr=report.rpr, macs_ratio=report.macs_ratio,
                                       final_check=report.extra.get("allocation", {}).get("final_check"))
                        else:
                            pruned = onnx.load(str(kept))
                            train = load_arrays(cifar_subset("train", args.train, 1, cache, shuffle=True))
                            pruned, _ = api.distill(pruned, model, train, epochs=args.kd_epochs, bn="train",
                                                    calibration_options={"batch_size": 64}, progress=False, seed=0)
                        row["seconds"] = time.perf_counter() - start
                        row["top1"], _ = top1(pruned, test)
                        row["drop_pt"] = 100 * (base - row["top1"])
                    except Exception as exc:  # a failed row is a result too
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    row["load_average"] = os.getloadavg()
                    results[name] = row
                    write_json(path, results)
                    print(key, name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                      if k != "final_check"}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
