"""Losses, loss inference and fine-tuning on plain tf.Variables (optimizer steps checked by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")

from worker.pruning.criteria import Magnitude  # noqa: E402
from worker.pruning.finetune import (  # noqa: E402
    Distillation,
    TrainingDiverged,
    count_steps,
    fine_tune,
    learning_rate_at,
)
from worker.pruning.losses import distill_fn, infer_loss, loss_fn  # noqa: E402
from worker.pruning.pruner import Pruner  # noqa: E402


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------- losses

LOGITS = np.array([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0]], dtype=np.float32)
LABELS = np.array([0, 2])


def test_sparse_and_categorical_cross_entropy_by_hand() -> None:
    expected = -np.mean(np.log(_softmax(LOGITS.astype(np.float64))[[0, 1], LABELS]))
    one_hot = np.eye(3, dtype=np.float32)[LABELS]
    probs = _softmax(LOGITS).astype(np.float32)
    for name, y in (("sparse_categorical_crossentropy", LABELS), ("categorical_crossentropy", one_hot)):
        assert float(loss_fn(name, True)(y, LOGITS)) == pytest.approx(expected, rel=1e-5)
        assert float(loss_fn(name, False)(y, probs)) == pytest.approx(expected, rel=1e-5)
    # Labels shaped (N, 1) are the same labels.
    value = loss_fn("sparse_categorical_crossentropy", True)(LABELS[:, None], LOGITS)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_binary_cross_entropy_by_hand() -> None:
    z = np.array([[-2.0], [0.3], [4.0]], dtype=np.float32)
    y = np.array([0, 1, 0])
    p = _sigmoid(z.astype(np.float64)).reshape(-1)
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert float(loss_fn("binary_crossentropy", True)(y, z)) == pytest.approx(expected, rel=1e-5)
    probs = _sigmoid(z).astype(np.float32)
    assert float(loss_fn("binary_crossentropy", False)(y, probs)) == pytest.approx(expected, rel=1e-4)


def test_regression_losses_do_not_broadcast_column_against_row() -> None:
    y = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    pred = np.array([[1.5], [2.0], [3.0]], dtype=np.float32)
    assert float(loss_fn("mse", False)(y, pred)) == pytest.approx((0.25 + 0 + 1) / 3)
    assert float(loss_fn("mae", False)(y, pred)) == pytest.approx((0.5 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="mse"):
        loss_fn("hinge", False)


def test_infer_loss() -> None:
    labels = np.array([0, 2, 1, 2])
    logits = np.array([[2.0, -1, 0], [0, 1, 5], [1, 2, 0], [-3, 0, 1]])
    assert infer_loss(labels, logits) == ("sparse_categorical_crossentropy", True)
    assert infer_loss(labels, _softmax(logits)) == ("sparse_categorical_crossentropy", False)
    assert infer_loss(labels.astype(np.float32)[:, None], logits) == ("sparse_categorical_crossentropy", True)
    assert infer_loss(np.eye(3)[labels], _softmax(logits)) == ("categorical_crossentropy", False)
    binary = np.array([0, 1, 1, 0])
    assert infer_loss(binary, np.array([[0.1], [0.9], [0.6], [0.3]])) == ("binary_crossentropy", False)
    assert infer_loss(binary, np.array([[-2.0], [3.0], [0.5], [-1.0]])) == ("binary_crossentropy", True)
    assert infer_loss(np.array([0.5, 2.5, -1.0, 3.0]), np.zeros((4, 1))) == ("mse", False)
    # Rows in [0, 1] that do not sum to 1 are not softmax outputs.
    assert infer_loss(labels, np.full((4, 3), 0.5)) == ("sparse_categorical_crossentropy", True)
    with pytest.raises(ValueError, match="3 classes"):
        infer_loss(np.array([0, 5, 1, 2]), logits)


# ---------------------------------------------------------------- fine-tuning


class _Linear(tf.Module):
    """The smallest classifier with plain variables: logits = x W + b."""

    def __init__(self, n_in: int, n_out: int, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = tf.Variable(rng.normal(scale=0.1, size=(n_in, n_out)).astype(np.float32), name="w")
        self.b = tf.Variable(np.zeros(n_out, np.float32), name="b")

    def forward(self, inputs: dict[str, tf.Tensor], training: bool) -> tf.Tensor:
        return tf.matmul(inputs["x"], self.w) + self.b


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32)[:600], data.target[:600].astype(np.int64)


def _eval_loss(model: _Linear, x: np.ndarray, y: np.ndarray) -> float:
    return float(
        loss_fn("sparse_categorical_crossentropy", True)(y, model.forward({"x": tf.constant(x)}, False))
    )


def test_fine_tune_lowers_loss_and_keeps_masked_weights_zero(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    model = _Linear(64, 10)
    pruner = Pruner({"w": model.w}, {"w": 0.5}, "layer", Magnitude())
    pruner.prune(1.0)
    before = _eval_loss(model, x, y)
    steps: list[int] = []
    epochs: list[tuple[int, float]] = []

    def after_step(step: int) -> None:
        steps.append(step)
        pruner.apply_masks()

    history = fine_tune(
        model.forward,
        [model.w, model.b],
        {"x": x},
        y,
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        epochs=3,
        batch_size=64,
        learning_rate=0.05,
        optimizer="adam",
        seed=0,
        after_step=after_step,
        on_epoch=lambda e, value: epochs.append((e, value)),
    )
    assert len(history) == 3 and history[-1] < history[0]
    assert _eval_loss(model, x, y) < 0.5 * before
    assert steps == list(range(1, count_steps(600, 64, 3) + 1))
    assert [e for e, _ in epochs] == [0, 1, 2] and [v for _, v in epochs] == history
    assert pruner.sparsity()["w"] == 0.5
    np.testing.assert_array_equal(model.w.numpy()[~pruner.masks["w"]], 0.0)


def _regression(n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    w0 = rng.normal(size=(3, 1)).astype(np.float32)
    return x, y, w0


def _mse_grad(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    return 2.0 / len(y) * x64.T @ (x64 @ w64 - y[:, None])


def _run(optimizer: str, epochs: int, lr: float, lr_decay: str = "constant") -> tuple[np.ndarray, np.ndarray]:
    x, y, w0 = _regression()
    w = tf.Variable(w0)
    fine_tune(
        lambda inputs, training: tf.matmul(inputs["x"], w),
        [w],
        {"x": x},
        y,
        loss="mse",
        from_logits=False,
        epochs=epochs,
        batch_size=len(y),  # one full batch per epoch: shuffling cannot change the gradient
        learning_rate=lr,
        optimizer=optimizer,  # type: ignore[arg-type]
        seed=0,
        lr_decay=lr_decay,  # type: ignore[arg-type]
    )
    return w0, w.numpy()


def test_sgd_step_by_hand_with_cosine_decay() -> None:
    x, y, _ = _regression()
    w0, w2 = _run("sgd", epochs=2, lr=0.1, lr_decay="cosine")
    w1 = w0 - 0.1 * _mse_grad(x, y, w0)  # step 0 of 2: full rate
    expected = w1 - 0.05 * _mse_grad(x, y, w1)  # step 1 of 2: (1 + cos(pi / 2)) / 2 = half
    np.testing.assert_allclose(w2, expected, rtol=1e-5, atol=1e-6)


def test_momentum_steps_by_hand() -> None:
    x, y, _ = _regression()
    w0, w2 = _run("momentum", epochs=2, lr=0.1)
    v1 = -0.1 * _mse_grad(x, y, w0)
    w1 = w0 + v1
    v2 = 0.9 * v1 - 0.1 * _mse_grad(x, y, w1)
    np.testing.assert_allclose(w2, w1 + v2, rtol=1e-5, atol=1e-6)


def test_adam_first_step_moves_each_weight_by_lr_times_sign() -> None:
    x, y, _ = _regression()
    w0, w1 = _run("adam", epochs=1, lr=0.01)
    # With bias correction, m_hat / sqrt(v_hat) = g / |g| on the first step.
    np.testing.assert_allclose(w1 - w0, -0.01 * np.sign(_mse_grad(x, y, w0)), rtol=1e-4)


def test_learning_rate_schedule_values() -> None:
    assert learning_rate_at(0, 10, 0.1) == 0.1
    assert learning_rate_at(5, 10, 0.1) == pytest.approx(0.05)
    assert learning_rate_at(9, 10, 0.1) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.9)) / 2)
    assert learning_rate_at(7, 10, 0.1, "constant") == 0.1
    with pytest.raises(ValueError):
        learning_rate_at(1, 10, 0.1, "step")  # type: ignore[arg-type]


def _small_run(seed: int, forward_calls: list[int] | None = None, **kwargs: object) -> list[float]:
    x, y = np.random.default_rng(5).normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3
    model = _Linear(4, 3, seed=1)

    def forward(inputs: dict[str, tf.Tensor], training: bool) -> tf.Tensor:
        if forward_calls is not None:
            forward_calls.append(1)  # Python side effect: runs once per trace only
        return model.forward(inputs, training)

    options: dict = {
        "loss": "sparse_categorical_crossentropy",
        "from_logits": True,
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.1,
        "optimizer": "sgd",
        "seed": seed,
        **kwargs,
    }
    return fine_tune(forward, [model.w, model.b], {"x": x}, y, **options)


def test_shuffle_is_seeded_and_partial_batch_costs_one_trace() -> None:
    calls: list[int] = []
    first = _small_run(0, calls)
    assert len(calls) <= 2  # 50 = 3 x 16 + 2: one trace for full batches, one for the remainder
    assert _small_run(0) == first
    assert _small_run(1) != first


def test_after_step_exceptions_propagate() -> None:
    seen: list[int] = []

    class Canceled(Exception):
        pass

    def cancel_at_three(step: int) -> None:
        seen.append(step)
        if step == 3:
            raise Canceled

    with pytest.raises(Canceled):
        _small_run(0, after_step=cancel_at_three)
    assert seen == [1, 2, 3]


def test_divergence_and_bad_arguments_are_reported() -> None:
    x, y, w0 = _regression()
    x = x * 1e3
    w = tf.Variable(w0)

    def run(**overrides: object) -> list[float]:
        options: dict = {
            "loss": "mse",
            "from_logits": False,
            "epochs": 5,
            "batch_size": 8,
            "learning_rate": 1e3,
            "optimizer": "sgd",
            "seed": 0,
            **overrides,
        }
        return fine_tune(lambda inputs, training: tf.matmul(inputs["x"], w), [w], {"x": x}, y, **options)

    with pytest.raises(TrainingDiverged, match="learning_rate"):
        run()
    with pytest.raises(ValueError, match="optimizer"):
        run(optimizer="rmsprop")
    with pytest.raises(ValueError, match="length"):
        fine_tune(
            lambda inputs, training: inputs["x"],
            [w],
            {"x": x[:3]},
            y,
            loss="mse",
            from_logits=False,
            epochs=1,
            batch_size=2,
            learning_rate=0.1,
            optimizer="sgd",
            seed=0,
        )
    unrelated = tf.Variable(1.0)
    with pytest.raises(ValueError, match="does not depend"):
        fine_tune(
            lambda inputs, training: tf.matmul(inputs["x"], w),
            [unrelated],
            {"x": x},
            y,
            loss="mse",
            from_logits=False,
            epochs=1,
            batch_size=8,
            learning_rate=0.1,
            optimizer="sgd",
            seed=0,
        )


# ---------------------------------------------------------------- distillation


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def test_softmax_distillation_is_t_squared_kl_of_softened_outputs_by_hand() -> None:
    teacher = np.array([[3.0, 1.0, -2.0], [0.0, 2.0, 0.5]], dtype=np.float32)
    student = np.array([[1.0, 1.5, -1.0], [0.5, 0.0, 1.0]], dtype=np.float32)
    for temperature in (1.0, 2.0, 4.0):
        t, s = teacher.astype(np.float64) / temperature, student.astype(np.float64) / temperature
        expected = temperature**2 * _kl(_softmax(t), _softmax(s))
        for name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
            value = float(distill_fn(name, True, temperature)(teacher, student))
            assert value == pytest.approx(expected, rel=1e-5)
            # The same models emitting probabilities give the same term (log p = logits + a row constant).
            probs = float(distill_fn(name, False, temperature)(_softmax(teacher), _softmax(student)))
            assert probs == pytest.approx(expected, rel=1e-4)
    assert float(distill_fn("sparse_categorical_crossentropy", True, 2.0)(teacher, teacher)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_binary_distillation_and_regression_distillation_by_hand() -> None:
    teacher = np.array([[2.0], [-1.0], [0.3]], dtype=np.float32)
    student = np.array([[0.5], [0.5], [-0.2]], dtype=np.float32)
    temperature = 3.0
    pt, ps = _sigmoid(teacher / temperature), _sigmoid(student / temperature)
    per_unit = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    expected = temperature**2 * float(np.mean(per_unit))
    assert float(distill_fn("binary_crossentropy", True, temperature)(teacher, student)) == pytest.approx(
        expected, rel=1e-4
    )
    from_probs = distill_fn("binary_crossentropy", False, temperature)(_sigmoid(teacher), _sigmoid(student))
    assert float(from_probs) == pytest.approx(expected, rel=1e-3)
    # Regression: the task's own loss against the dense outputs; the temperature plays no part.
    for temperature in (1.0, 5.0):
        mse = float(distill_fn("mse", False, temperature)(teacher, student))
        assert mse == pytest.approx(float(np.mean((teacher - student) ** 2)), rel=1e-5)
        mae = float(distill_fn("mae", False, temperature)(teacher.reshape(-1), student))  # (N,) vs (N, 1)
        assert mae == pytest.approx(float(np.mean(np.abs(teacher - student))), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distill_fn("mse", False, 0.0)
    with pytest.raises(ValueError, match="hinge"):
        distill_fn("hinge", False, 1.0)


def _distill_run(
    teacher_model: _Linear, alpha: float | None, y: np.ndarray, x: np.ndarray
) -> tuple[_Linear, list[float]]:
    """A fresh student trained on (x, y) with soft targets from ``teacher_model`` (``alpha`` None: none)."""
    student = _Linear(64, 10, seed=1)
    teacher = teacher_model.forward({"x": tf.constant(x)}, False).numpy()
    history = fine_tune(
        student.forward,
        [student.w, student.b],
        {"x": x},
        y,
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        epochs=8,
        batch_size=64,
        learning_rate=0.05,
        optimizer="adam",
        seed=0,
        lr_decay="constant",
        distill=None if alpha is None else Distillation(teacher, alpha=alpha, temperature=2.0),
    )
    return student, history


def test_distillation_pulls_the_student_to_the_teacher_not_to_the_labels(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    teacher = _Linear(64, 10)
    fine_tune(
        teacher.forward,
        [teacher.w, teacher.b],
        {"x": x},
        y,
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        epochs=10,
        batch_size=64,
        learning_rate=0.05,
        optimizer="adam",
        seed=0,
    )
    wrong = np.random.default_rng(0).permutation(y)  # labels that carry no information

    def agreement(model: _Linear) -> float:
        ours = model.forward({"x": tf.constant(x)}, False).numpy().argmax(axis=1)
        return float(np.mean(ours == teacher.forward({"x": tf.constant(x)}, False).numpy().argmax(axis=1)))

    labels_only, _ = _distill_run(teacher, None, wrong, x)
    teacher_only, history = _distill_run(teacher, 1.0, wrong, x)
    assert agreement(teacher_only) > 0.9 > 0.5 > agreement(labels_only)
    # The history is the task loss on the (wrong) labels, whatever the objective: comparable across runs.
    assert history[-1] > 1.5
    # alpha 0 is exactly the labels-only objective.
    zero, _ = _distill_run(teacher, 0.0, wrong, x)
    np.testing.assert_allclose(zero.w.numpy(), labels_only.w.numpy(), rtol=1e-5, atol=1e-6)


def test_distillation_arguments_are_checked(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    model = _Linear(64, 10)
    options: dict = {
        "loss": "sparse_categorical_crossentropy",
        "from_logits": True,
        "epochs": 1,
        "batch_size": 64,
        "learning_rate": 0.01,
        "optimizer": "sgd",
        "seed": 0,
    }
    with pytest.raises(ValueError, match="teacher outputs for 5 samples"):
        fine_tune(model.forward, [model.w], {"x": x}, y, distill=Distillation(np.zeros((5, 10))), **options)
    with pytest.raises(ValueError, match="alpha"):
        fine_tune(
            model.forward,
            [model.w],
            {"x": x},
            y,
            distill=Distillation(np.zeros((len(y), 10)), 1.5),
            **options,
        )
