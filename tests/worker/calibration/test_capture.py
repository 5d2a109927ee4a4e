"""capture.py: every supported op's ``X @ matrix(W)`` reproduces what the op computes, read from the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from worker.models import load_model  # noqa: E402
from worker.pruning.calibration.capture import (  # noqa: E402
    CaptureSession,
    dependency_waves,
    find_uses,
    uses_by_variable,
)
from worker.structure.frozen import freeze_signature  # noqa: E402


def _module_dir(root: Path, size: int | None = 9) -> Path:
    """A plain tf.Module: einsum (weight first and second), transpose_b matmul, strided/dilated/explicit-pad
    convs, and a weight that reaches its op through arithmetic (unsupported). ``size=None``: images of any
    height and width (the padding and output sizes are then computed in the graph)."""
    rng = np.random.default_rng(0)

    def var(*shape: int) -> tf.Variable:
        return tf.Variable(rng.normal(size=shape).astype("float32"))

    class M(tf.Module):
        def __init__(self) -> None:
            self.c1 = var(3, 3, 3, 4)
            self.c2 = var(2, 2, 4, 5)
            self.c3 = var(3, 3, 5, 6)
            self.e1 = var(6, 2, 3)
            self.e2 = var(4, 6)
            self.t = var(7, 4)
            self.s = var(7, 3)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            h = tf.nn.conv2d(x, self.c1, strides=2, padding="SAME")
            h = tf.nn.conv2d(h, self.c2, strides=1, padding=[[0, 0], [1, 0], [0, 1], [0, 0]])
            h = tf.nn.conv2d(h, self.c3, strides=1, padding="SAME", dilations=2)
            h = tf.reduce_mean(h, axis=[1, 2])  # (n, 6)
            e = tf.einsum("nc,chd->nhd", h, self.e1)  # (n, 2, 3)
            g = tf.einsum("oc,nc->no", self.e2, h)  # (n, 4)
            t = tf.matmul(g, self.t, transpose_b=True)  # (n, 7)
            s = tf.matmul(t, self.s * 2.0)
            return {"e": e, "s": s}

    m = M()
    tf.saved_model.save(m, str(root), signatures={"serving_default": m.serve})
    return root


@pytest.fixture(scope="module", params=[9, None], ids=["static", "dynamic-size"])
def module_sig(request, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    handle = load_model(_module_dir(tmp_path_factory.mktemp("capture") / "m", request.param))
    return handle, freeze_signature(handle, "serving_default")


def test_every_supported_op_is_reproduced_by_x_times_matrix(module_sig) -> None:  # type: ignore[no-untyped-def]
    handle, sig = module_sig
    values = {nv.name: np.asarray(nv.var.value()) for nv in handle.variables()}
    uses = uses_by_variable(find_uses(sig))
    names = {nv.name: nv for nv in handle.variables()}
    kinds = {names[v].name: u[0].kind for v, u in uses.items()}
    assert sorted(kinds.values()).count("conv2d") == 3
    assert sorted(kinds.values()).count("einsum") == 2
    unsupported = [u[0] for u in uses.values() if not u[0].supported]
    assert len(unsupported) == 1 and "Mul" in (unsupported[0].reason or "")
    x = {"x": np.random.default_rng(1).normal(size=(3, 9, 9, 3)).astype("float32")}
    with CaptureSession(sig) as session:
        for var_uses in uses.values():
            use = var_uses[0]
            if not use.supported:
                continue
            X, Y, gram, sq, rows = session.run(
                values,
                x,
                [
                    session.x_matrix(use),
                    use.output,
                    session.gram(use),
                    session.sq_norms(use),
                    session.rows(use),
                ],
            )
            W = use.matrix(values[use.variable])
            assert X.shape == (int(rows), W.shape[0])
            np.testing.assert_allclose(X @ W, Y.reshape(len(X), -1), atol=1e-4, err_msg=use.variable)
            np.testing.assert_allclose(gram, X.T @ X, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(sq, (X**2).sum(0), rtol=1e-4, atol=1e-3)
            np.testing.assert_array_equal(use.unmatrix(W, values[use.variable].shape), values[use.variable])
            if use.kind == "conv2d":  # SparseGPT's sampled Hessian: exact when every position fits ...
                whole, half = session.run(
                    values, x, [session.gram(use, 10**6), session.gram(use, len(X) // 2)]
                )
                np.testing.assert_allclose(whole, X.T @ X, rtol=1e-4, atol=1e-3)
                # ... else (positions / drawn) x the X^T X of a subset of the rows: below the full one
                part = half * (len(X) // 2) / len(X)
                assert np.linalg.eigvalsh(X.T @ X - part).min() > -1e-3 * np.trace(X.T @ X)
                assert 0.2 < np.trace(part) / np.trace(X.T @ X) < 0.8
        waves = dependency_waves(sig, [u[0] for u in uses.values() if u[0].supported])
    assert len(waves) == 5  # c1, c2, c3, {e1, e2}, t


def test_keras_layers_conv1d_depthwise_mha(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    inp = keras.Input((10, 10, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c")(inp)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.Reshape((64, 4))(x)
    x = keras.layers.Conv1D(6, 3, name="c1d")(x)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    keras.Model(inp, out).export(str(tmp_path / "m"), verbose=False)
    handle = load_model(tmp_path / "m")
    sig = freeze_signature(handle, "serving_default")
    values = {nv.name: np.asarray(nv.var.value()) for nv in handle.variables()}
    uses = {u.variable: u for u in find_uses(sig) if u.supported}
    assert {v.rsplit("/", 1)[0] for v in uses} >= {
        "c",
        "dw",
        "c1d",
        "mha/query",
        "mha/attention_output",
        "head",
    }
    assert uses["dw/kernel"].kind == "depthwise"
    assert uses["mha/query/kernel"].in_axes == (0,) and uses["mha/query/kernel"].out_axes == (1, 2)
    x = {"image": np.random.default_rng(2).normal(size=(2, 10, 10, 3)).astype("float32")}
    with CaptureSession(sig) as session:
        for name, use in uses.items():
            X, Y = session.run(values, x, [session.x_matrix(use), use.output])
            w = values[name]
            if use.kind == "depthwise":
                kh, kw, c, m = w.shape
                got = np.einsum("rkc,kcm->rcm", X.reshape(-1, kh * kw, c), w.reshape(kh * kw, c, m))
            else:
                got = X @ use.matrix(w)
            np.testing.assert_allclose(
                got.reshape(len(X), -1), Y.reshape(len(X), -1), atol=1e-4, err_msg=name
            )


def test_sequential_sparsegpt_feeds_cached_outputs_with_the_same_result(tmp_path: Path) -> None:
    """With the reuse plan each wave feeds the tensors earlier waves made final (conv outputs, and the residual
    stream after its add and ReLU, not recomputed from the last conv) instead of recomputing them from the
    inputs: same weights and masks as recomputing everything (residual block included)."""
    from tests.worker.structure import builders
    from worker.pruning.calibration.capture import reuse_plan
    from worker.pruning.calibration.sparsegpt import sparsegpt_sequential

    handle = load_model(builders.keras3_resnet(tmp_path / "resnet"))
    sig = freeze_signature(handle, "serving_default")
    dense = {nv.name: np.asarray(nv.var.value()) for nv in handle.variables()}
    uses = [u for u in find_uses(sig) if u.supported]
    waves = dependency_waves(sig, uses)
    plan = reuse_plan(sig, waves)
    assert len(waves) == 5  # stem, block_a, block_b, proj, head
    assert not plan.feeds[0] and not plan.keep[-1]
    # proj reads the residual stream after block_b: the ReLU outputs are fed, not their inputs' chain
    assert any(f.endswith("/Relu:0") for f in plan.feeds[3]), plan.feeds[3]
    assert all("batchnorm" not in f for f in plan.feeds[3] + plan.keep[0])  # weight-only subgraphs
    for j, kept in enumerate(plan.keep):  # kept where it is first final, fed only later
        assert all(max(k for k, fed in enumerate(plan.feeds) if name in fed) > j for name in kept)
    plans = {u.variable: {"target": 0.5} for u in uses}
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 12, 12, 3)).astype("float32")

    def batches():  # type: ignore[no-untyped-def]
        return ({"image": data[i : i + 8]} for i in range(0, 20, 8))

    results = []
    with CaptureSession(sig) as session:
        for reuse in (None, plan):
            values = dict(dense)
            results.append(
                sparsegpt_sequential(session, waves, values, plans, batches, max_dim=4096, reuse=reuse)
            )
    plain, cached = results
    assert sorted(plain.results) == sorted(cached.results) == sorted(plans)
    for name, obs in plain.results.items():
        np.testing.assert_array_equal(obs.keep, cached.results[name].keep)
        np.testing.assert_allclose(obs.weight, cached.results[name].weight, rtol=1e-4, atol=1e-5)
        assert (~obs.keep).sum() == round(0.5 * obs.keep.size)
