"""BatchNormalization statistics in distillation: frozen, re-estimated (``recompute``) and trained."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_ocnna.distill import OnnxModule, check_agreement, distill, write_back
from onnx_ocnna.distill.conv_norm import ConvNorms, kept_channels
from onnx_ocnna.distill.train import DistillSettings, _Distiller
from onnx_ocnna.errors import InputError

BN_STATS = ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var",
            "bn3.running_mean", "bn3.running_var")


@dataclass
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


def batches_of(images, labels, index, batch=64):
    index = np.asarray(index)

    def gen():
        for start in range(0, len(index), batch):
            part = index[start : start + batch]
            yield Batch({"input": images[part]}, labels[part])

    return gen


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bn_inputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """BN node name prefix ("bn1", ...) -> the input that BN receives in ONNX Runtime, [N, C, H, W]."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    bns = [n for n in probe.graph.node if n.op_type == "BatchNormalization"]
    for n in bns:
        probe.graph.output.append(helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([n.input[0] for n in bns], {"input": x})
    return {n.input[1].split(".")[0]: o for n, o in zip(bns, outs)}


def shifted_student(model: onnx.ModelProto, factor: float = 3.0) -> onnx.ModelProto:
    """``model`` with conv1's and conv2's weights scaled: the BN inputs no longer match the stored statistics."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    for init in student.graph.initializer:
        if init.name in ("conv1.weight", "conv2.weight"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    return student


def test_recomputed_statistics_are_those_of_the_written_back_network(digits) -> None:
    model, split, images, _ = digits
    x = images[np.array(split["train"])]
    module = OnnxModule(shifted_student(model)).train()
    assert sorted(module.buffer_names[b] for b in module.stat_buffers) == sorted(BN_STATS)
    module.batch_stats, module.bn_momentum = True, None
    module.reset_bn_average()
    with torch.no_grad():
        module(torch.from_numpy(x))  # one batch: the cumulative average is that batch's statistics
    out = write_back(module.eval(), model)
    values = inits(out)
    for bn, inp in bn_inputs(out, x).items():
        np.testing.assert_allclose(values[f"{bn}.running_mean"], inp.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(values[f"{bn}.running_var"], inp.var((0, 2, 3), ddof=1), rtol=1e-3, atol=1e-4)
    assert not np.allclose(values["bn1.running_mean"], inits(model)["bn1.running_mean"], rtol=0.1)
    assert check_agreement(out, module, {"input": x[:32]}) < 1e-4


def test_batch_statistics_update_with_momentum_only_when_asked(digits) -> None:
    model, _, images, _ = digits
    x = torch.from_numpy(images[:50])
    module = OnnxModule(model).train()
    before = module.c_bn1_running_mean.clone()
    with torch.no_grad():
        module(x)
    torch.testing.assert_close(module.c_bn1_running_mean, before)  # frozen by default, also in train()
    module.batch_stats = True
    conv = torch.nn.functional.conv2d(x, module.params["conv1_weight"], padding=1)
    with torch.no_grad():
        module(x)
    torch.testing.assert_close(module.c_bn1_running_mean, 0.9 * before + 0.1 * conv.mean((0, 2, 3)))
    module.eval()
    with torch.no_grad():  # eval() normalises with the (now updated) running statistics and leaves them
        module(x)
    torch.testing.assert_close(module.c_bn1_running_mean, 0.9 * before + 0.1 * conv.mean((0, 2, 3)))


def test_distiller_recompute_averages_batches_and_restores_the_student(digits) -> None:
    model, split, images, labels = digits
    student = shifted_student(model)
    train = np.array(split["train"])[:960]  # 15 batches of 64: the average of batch means is the mean
    d = _Distiller(student, model, DistillSettings(bn="recompute", threads=1, progress=False))
    assert d.recompute_bn(batches_of(images, labels, train)) == 960
    conv1 = bn_inputs(student, images[train])["bn1"]
    np.testing.assert_allclose(d.module.c_bn1_running_mean.numpy(), conv1.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    per_batch = [conv1[i : i + 64].var((0, 2, 3), ddof=1) for i in range(0, 960, 64)]
    np.testing.assert_allclose(d.module.c_bn1_running_var.numpy(), np.mean(per_batch, 0), rtol=1e-4)
    assert not d.module.batch_stats and d.module.bn_momentum == 0.1


def test_distill_bn_modes_end_to_end(digits) -> None:
    model, split, images, labels = digits
    student = shifted_student(model)
    test = np.array(split["test"])
    common = dict(epochs=1, lr=1e-3, hflip=False, threads=1, progress=False,
                  eval_batches=batches_of(images, labels, test, batch=256))
    train = batches_of(images, labels, split["train"])
    frozen, f_report = distill(student, model, train, bn="frozen", **common)
    for name in BN_STATS:  # untouched
        np.testing.assert_array_equal(inits(frozen)[name], inits(student)[name])
    assert f_report.bn_recomputed_samples == 0 and f_report.bn_recomputed_accuracy is None

    recomputed, r_report = distill(student, model, train, bn="recompute", **common)
    assert r_report.bn_recomputed_samples == len(split["train"])
    # Scaled convolutions before BatchNorm: re-estimated statistics undo the damage.
    assert f_report.initial_agreement < 0.8
    assert r_report.bn_recomputed_agreement > max(0.95, f_report.initial_agreement + 0.15)
    assert r_report.epochs[-1].eval_accuracy > f_report.epochs[-1].eval_accuracy

    trained, t_report = distill(student, model, train, bn="train", **common)
    assert t_report.check_max_diff < 1e-4
    assert not np.allclose(inits(trained)["bn2.running_var"], inits(recomputed)["bn2.running_var"])
    # The file alone reproduces the reported held-out agreement: the statistics were written back.
    t_pred = ort.InferenceSession(model.SerializeToString()).run(None, {"input": images[test]})[0].argmax(1)
    for out, report in ((recomputed, r_report), (trained, t_report)):
        s_pred = ort.InferenceSession(out.SerializeToString()).run(None, {"input": images[test]})[0].argmax(1)
        assert (s_pred == t_pred).mean() == pytest.approx(report.epochs[-1].eval_agreement)
        assert [n.op_type for n in out.graph.node] == [n.op_type for n in student.graph.node]


def test_bn_mode_is_checked(digits) -> None:
    model, split, images, labels = digits
    with pytest.raises(InputError, match="BatchNormalization mode"):
        distill(model, model, batches_of(images, labels, split["train"]), bn="update", progress=False)


# ---------------------------------------------------------------------------------------
# Folded exports: a temporary normalisation per Conv, folded back at write-back


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Conv -> BatchNormalization pair folded into one Conv with a bias."""
    values = inits(model)
    bns = {n.input[0]: n for n in model.graph.node if n.op_type == "BatchNormalization"}
    nodes, new_inits = [], {k: v for k, v in values.items() if "bn" not in k}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            continue
        bn = bns.get(node.output[0]) if node.op_type == "Conv" else None
        if bn is not None:
            gamma, beta, mean, var = (values[i] for i in bn.input[1:5])
            scale = gamma / np.sqrt(var + 1e-5)
            w = node.input[1]
            new_inits[w] = values[w] * scale[:, None, None, None]
            new_inits[w.replace("weight", "bias")] = (beta - mean * scale).astype(np.float32)
            node = helper.make_node("Conv", [node.input[0], w, w.replace("weight", "bias")], [bn.output[0]],
                                    name=node.name, **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        nodes.append(node)
    graph = helper.make_graph(nodes, "folded", list(model.graph.input), list(model.graph.output),
                              [numpy_helper.from_array(v, k) for k, v in new_inits.items()])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


@pytest.fixture(scope="module")
def folded_digits(digits):
    model, split, images, labels = digits
    return folded(model), split, images, labels


def test_folding_fixture_is_the_same_function(digits, folded_digits) -> None:
    model, split, images, _ = digits
    x = images[np.array(split["test"])]
    student = folded_digits[0]
    assert "BatchNormalization" not in {n.op_type for n in student.graph.node}
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    got = ort.InferenceSession(student.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_conv_norms_are_the_identity_until_trained_and_fold_exactly(folded_digits) -> None:
    model, split, images, _ = folded_digits
    x = images[np.array(split["test"])]
    module = OnnxModule(model)
    norms = ConvNorms(module, model)
    module.conv_norms = norms
    assert [c[1] for c in norms.convs] == ["conv1.weight", "conv2.weight", "conv3.weight"]
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(module.eval().run({"input": x})[0], ref, rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # any trained state must fold into the Conv exactly
        for p in [*norms.parameters(), *norms.stats()]:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    out = write_back(module, model)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    assert check_agreement(out, module, {"input": x}) < 1e-4
    assert not np.allclose(inits(out)["conv2.bias"], inits(model)["conv2.bias"])


def test_conv_norms_skip_normalised_shared_or_bias_free_convs(digits) -> None:
    model = digits[0]
    assert len(ConvNorms(OnnxModule(model), model)) == 0  # every Conv already feeds a BatchNormalization
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"]), helper.make_node("Conv", ["h", "w"], ["y"])]
    shared = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, b]))
    assert len(ConvNorms(OnnxModule(shared), shared)) == 0  # w is shared, the second Conv has no bias


def other_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Conv bias moved a little: no longer the teacher's exact values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name.endswith(".bias") and init.name.startswith("conv"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1e-3, init.name))
    return out


def test_kept_channels_finds_a_pruned_copy_in_order() -> None:
    teacher = np.array([0.5, -1.25, 3.0, 0.75, 2.5], np.float32)
    assert kept_channels(teacher[[0, 2, 4]], teacher) == [0, 2, 4]
    assert kept_channels(teacher, teacher) == [0, 1, 2, 3, 4]
    assert kept_channels(teacher[[2, 0]], teacher) is None  # out of order: not a pruned copy
    assert kept_channels(np.array([0.5, 7.0], np.float32), teacher) is None  # a trained value
    assert kept_channels(np.concatenate([teacher, teacher[:1]]), teacher) is None


def test_recompute_collects_conv_statistics_without_normalising(folded_digits) -> None:
    model, split, images, labels = folded_digits
    train = np.array(split["train"])
    d = _Distiller(model, other_biases(model), DistillSettings(bn="train", threads=1, progress=False))
    assert d.recompute_bn(batches_of(images, labels, train, batch=len(train))) == len(train)
    assert not d.norms.targets  # no Conv of the teacher has the student's biases
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [c[0] for c in d.norms.convs]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    outs = ort.InferenceSession(probe.SerializeToString()).run(names, {"input": images[train]})
    for i, y in enumerate(outs):  # the statistics of the unchanged network's Conv outputs
        np.testing.assert_allclose(getattr(d.norms, f"mean_n{i}").numpy(), y.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(getattr(d.norms, f"var_n{i}").numpy(), y.var((0, 2, 3), ddof=1), rtol=1e-3)
    np.testing.assert_allclose(d.norms.gamma["n2"].detach().numpy(), np.sqrt(outs[2].var((0, 2, 3), ddof=1) + 1e-5),
                               rtol=1e-3)


def test_teacher_statistics_repair_a_folded_student(folded_digits) -> None:
    model, split, images, labels = folded_digits
    train, test = np.array(split["train"]), np.array(split["test"])
    teacher = other_biases(model)
    student = shifted_student(teacher)  # scaled Convs, the teacher's biases: a damaged copy
    d = _Distiller(student, teacher, DistillSettings(bn="train", threads=1, progress=False))
    d.recompute_bn(batches_of(images, labels, train, batch=len(train)))
    assert sorted(d.norms.targets) == ["n0", "n1", "n2"]
    probe = onnx.ModelProto()
    probe.CopyFrom(teacher)
    probe.graph.output.append(helper.make_tensor_value_info(d.norms.convs[1][0], onnx.TensorProto.FLOAT, None))
    y = ort.InferenceSession(probe.SerializeToString()).run(None, {"input": images[train]})[1]
    np.testing.assert_allclose(d.norms.beta["n1"].detach().numpy(), y.mean((0, 2, 3)), rtol=1e-3, atol=1e-3)
    # Scaling a Conv before a normalisation is undone exactly: the repaired student is the teacher.
    ref = ort.InferenceSession(teacher.SerializeToString()).run(None, {"input": images[test]})[0].argmax(1)
    out = ort.InferenceSession(write_back(d.module.eval(), student).SerializeToString())
    assert (out.run(None, {"input": images[test]})[0].argmax(1) == ref).mean() > 0.97


def test_distill_train_mode_on_a_folded_model(folded_digits) -> None:
    model, split, images, labels = folded_digits
    student = shifted_student(other_biases(model))
    test = np.array(split["test"])
    distilled, report = distill(student, model, batches_of(images, labels, split["train"]), epochs=1, lr=1e-3,
                                hflip=False, threads=1, progress=False, bn="train",
                                eval_batches=batches_of(images, labels, test, batch=256))
    assert report.settings["conv_norms"] == 3 and report.settings["bn_layers"] == 0
    assert report.settings["conv_norms_from_teacher"] == 0
    assert report.bn_recomputed_agreement == pytest.approx(report.initial_agreement)  # identity after recompute
    assert report.check_max_diff < 1e-4
    assert [t.name for t in distilled.graph.initializer] == [t.name for t in student.graph.initializer]
    t_pred = ort.InferenceSession(model.SerializeToString()).run(None, {"input": images[test]})[0].argmax(1)
    s_pred = ort.InferenceSession(distilled.SerializeToString()).run(None, {"input": images[test]})[0].argmax(1)
    assert (s_pred == t_pred).mean() == pytest.approx(report.epochs[-1].eval_agreement)
    assert report.epochs[-1].eval_agreement > report.initial_agreement + 0.1


class _Stop(Exception):
    pass


def test_resume_restores_trained_statistics(folded_digits, tmp_path) -> None:
    model, split, images, labels = folded_digits
    student = shifted_student(model)  # teacher targets and batch statistics both in play
    train = batches_of(images, labels, split["train"][:512])
    common = dict(epochs=2, lr=1e-3, hflip=False, threads=1, progress=False, bn="train")
    reference, _ = distill(student, model, train, **common)

    def stop(record):
        raise _Stop

    with pytest.raises(_Stop):
        distill(student, model, train, checkpoint_dir=tmp_path, epoch_callback=stop, **common)
    resumed, report = distill(student, model, train, checkpoint_dir=tmp_path, resume=True, **common)
    assert report.settings["resumed_after_epoch"] == 1
    for name, value in inits(reference).items():
        np.testing.assert_array_equal(inits(resumed)[name], value, err_msg=name)
