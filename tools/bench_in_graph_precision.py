"""Benchmark (prints measured numbers): the precision of OCNNA's tau = 1 statistic reduced
inside the ONNX Runtime graph, against the same statistic from the returned maps in float64.

For each model and the same calibration images it runs two sessions of the prepared model:
one returning every measured map, one with the column-moment reductions the scoring uses
(``onnx_ocnna.reductions``). Per measured tensor it compares F (per image and channel) and
the per-layer scores mean(F) / std(F) from

* the reductions (float32 means of column moments, :func:`energy_from_column_moments`),
* the maps in float32 (the ``in_graph=False`` path),

with F from the maps in float64, and says whether each layer's ranking is the float64 one.

    python tools/bench_in_graph_precision.py [--models M.onnx ...] [--images DIR] [--samples 1024] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from onnx_ocnna import api
from onnx_ocnna.collect import _reductions, with_outputs, with_reductions
from onnx_ocnna.criteria import get_criterion
from onnx_ocnna.criteria.ocnna import energy_from_column_moments, ocnna_frobenius, snr_scores
from onnx_ocnna.model_io import ort_session

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data"
DEFAULT_MODELS = [SHARED / "models" / f"{name}.onnx" for name in
                  ("resnet56_ts_opset13", "resnet56_ts_opset13_bn", "resnet20_ts_opset13", "resnet20_dynamo_opset18")]


def measure(path: Path, images: Path, samples: int, preprocess: str) -> dict:
    model = onnx.load(path)
    source = api.as_source(str(images), model, preprocess=preprocess, max_samples=samples, batch_size=64)
    pruner = api.pruner_for(model, source)
    analysis = pruner.analysis
    # The tensors and reductions scoring itself would choose.
    criterion = get_criterion("ocnna", pca_variance=1.0)
    accumulators = {m: criterion.new_accumulator(api.member_info(analysis, m))
                    for g in analysis.groups if g.prunable for m in g.members}
    measured = {m: analysis.group_of(m).measured[m] for m in accumulators}
    reductions = _reductions(analysis, analysis.graph.tensors(), accumulators, measured)
    names = sorted(reductions)
    maps_session = ort_session(with_outputs(pruner.prepared_model(), names))
    reduced_model, located = with_reductions(pruner.prepared_model(), reductions)
    reduced_session = ort_session(reduced_model)
    packed = sorted({out for places in located.values() for out, _, _ in places})
    f = {kind: {n: [] for n in names} for kind in ("f64", "maps32", "graph")}
    for batch in source.batches():
        feeds = {i.name: batch.feeds[i.name] for i in maps_session.get_inputs()}
        maps = dict(zip(names, maps_session.run(names, feeds)))
        outputs = dict(zip(packed, reduced_session.run(packed, feeds)))
        for n in names:
            f["f64"][n].append(ocnna_frobenius(maps[n].astype(np.float64), 1.0, dtype=np.float64))
            f["maps32"][n].append(ocnna_frobenius(maps[n], 1.0))
            mean_square, squared_mean = (outputs[out][:, a:b] for out, a, b in located[n])
            f["graph"][n].append(np.sqrt(energy_from_column_moments(mean_square, squared_mean, reductions[n].height,
                                                                    reductions[n].width)))
    result = {"model": path.name, "tensors": len(names)}
    for kind in ("maps32", "graph"):
        f_err = score_err = 0.0
        same = 0
        for n in names:
            exact, got = np.concatenate(f["f64"][n]), np.concatenate(f[kind][n])
            live = exact > 0
            f_err = max(f_err, float(np.max(np.abs(got - exact)[live] / exact[live], initial=0.0)))
            if np.any(got[~live] != 0):
                f_err = float("inf")  # a dead or constant map must stay exactly 0
            s_exact = snr_scores(exact.mean(0), exact.std(0))
            s_got = snr_scores(got.mean(0), got.std(0))
            finite = np.isfinite(s_exact) & (s_exact > 0)
            score_err = max(score_err, float(np.max(np.abs(s_got - s_exact)[finite] / s_exact[finite], initial=0.0)))
            same += bool(np.array_equal(np.argsort(s_exact, kind="stable"), np.argsort(s_got, kind="stable")))
        result[kind] = {"max_rel_err_F": f_err, "max_rel_err_layer_scores": score_err, "same_ranking": same}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--images", type=Path, default=SHARED / "cifar10/train")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--preprocess", default="imagenet-32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = []
    print(f"{'model':<28} {'tensors':>7}  {'path':<7} {'max rel err F':>13} {'layer scores':>12} {'same ranking':>12}")
    for path in args.models:
        row = measure(path, args.images, args.samples, args.preprocess)
        rows.append(row)
        for kind in ("maps32", "graph"):
            r = row[kind]
            print(f"{row['model']:<28} {row['tensors']:>7}  {kind:<7} {r['max_rel_err_F']:>13.2e} "
                  f"{r['max_rel_err_layer_scores']:>12.2e} {r['same_ranking']:>8}/{row['tensors']}")
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "images": str(args.images), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
