"""A small character-level transformer language model on the Python standard library's source, for issue 21 (a).

Why this model: the papers' claims (SparseGPT, Wanda) are about language models; a LLaMA does not fit this
machine, but their mechanism (layer-wise reconstruction from calibration inputs) already shows on a char-level
LM of a few hundred thousand parameters, trained here in minutes on a corpus that ships with every Python.

- Corpus: every ``*.py`` file under the running interpreter's ``sysconfig.get_paths()["stdlib"]``, sorted by
  relative path, without tests (``test``/``tests``/``idle_test`` directories), ``site-packages`` and
  ``__pycache__``. A file is held out when the first byte of the SHA-1 of its relative path is below 26 (~10%):
  a deterministic split *by file*, so held-out text is never a neighbour of training text. Characters are
  ASCII codes (vocabulary 128); any other character maps to 0. Files are joined with a newline.
- Model (Keras 3, ``model.export``): token + position embeddings, ``blocks`` pre-LayerNorm blocks of causal
  multi-head self-attention and an MLP (``Dense -> gelu -> Dense``, 4x wide), a final LayerNorm and a ``head``
  Dense to the 128 logits. The attention's q/k/v/o projections are ``Dense`` layers (the arithmetic of Keras'
  ``MultiHeadAttention``, written out): ``MultiHeadAttention`` keeps its kernels as rank-3 ``EinsumDense``
  weights, which the service classifies as ``einsum`` kind, and N:M granularity has no defined reduction axis
  for those (worker/pruning/granularity.py) -- the bench must prune attention at 2:4 too. Every block weight
  is named ``block<i>_*`` so a spec's ``include: ["block"]`` selects exactly the attention and MLP kernels
  (embeddings and head stay dense, as in the papers).
- Training: ``steps`` Adam steps (cosine decay, 200 warm-up steps) of ``batch`` random windows of
  ``context + 1`` characters of the training text (seeded), next-character cross-entropy; cached by
  ``tests.support.model_cache.cached_model`` so later runs reuse it.
- Perplexity: ``exp`` of the mean next-character cross-entropy (nats) over every position of the first
  ``eval_windows`` non-overlapping windows of the held-out text, computed here from a SavedModel's
  ``serving_default`` (the dense upload or a job's artifact alike).
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 128
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"})
HELD_OUT_BELOW = 26  # first SHA-1 byte of the relative path below this: held-out file (~10%)
INPUT = "tokens"


@dataclass(frozen=True)
class LMConfig:
    """Model, corpus and training sizes; every field is part of the model cache key."""

    d_model: int = 128
    heads: int = 4
    blocks: int = 2
    context: int = 128
    steps: int = 2500
    batch: int = 32
    learning_rate: float = 2e-3
    max_train_chars: int = 6_000_000  # the first files (in path order) up to this many characters
    max_eval_chars: int = 600_000
    seed: int = 0


SMOKE_LM = LMConfig(
    d_model=32,
    heads=2,
    blocks=2,
    context=32,
    steps=30,
    batch=16,
    max_train_chars=200_000,
    max_eval_chars=40_000,
)


# -- corpus --------------------------------------------------------------------------------------------------


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the stdlib's ``*.py`` files in path order (tests and packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def held_out(rel: str) -> bool:
    return hashlib.sha1(rel.encode()).digest()[0] < HELD_OUT_BELOW


def encode(text: str) -> np.ndarray:
    """ASCII codes as int32; any other character is 0."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < VOCAB, codes, 0).astype(np.int32)


@functools.cache
def corpus(cfg: LMConfig) -> dict[str, Any]:
    """The train and held-out token streams plus what they came from."""
    parts: dict[str, list[str]] = {"train": [], "held_out": []}
    chars = {"train": 0, "held_out": 0}
    limit = {"train": cfg.max_train_chars, "held_out": cfg.max_eval_chars}
    files = {"train": 0, "held_out": 0}
    for rel, path in stdlib_files():
        side = "held_out" if held_out(rel) else "train"
        if chars[side] >= limit[side]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts[side].append(text)
        chars[side] += len(text) + 1
        files[side] += 1
    streams = {side: encode("\n".join(texts))[: limit[side]] for side, texts in parts.items()}
    return {
        "train": streams["train"],
        "held_out": streams["held_out"],
        "files": files,
        "chars": {side: len(s) for side, s in streams.items()},
        "stdlib": sysconfig.get_paths()["stdlib"],
        "python": platform.python_version(),
    }


def windows(stream: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` random windows of ``length`` tokens (seeded)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - length, size=n)
    return np.stack([stream[s : s + length] for s in starts])


def eval_windows(stream: np.ndarray, context: int, count: int) -> np.ndarray:
    """The first ``count`` non-overlapping windows of ``context + 1`` tokens."""
    count = min(count, (len(stream) - 1) // context)
    return np.stack([stream[i * context : i * context + context + 1] for i in range(count)])


def calibration_inputs(cfg: LMConfig, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``n`` random training-text windows of ``context`` tokens: a calibration dataset (inputs only)."""
    data = corpus(cfg)
    return {"x": windows(data["train"], n, cfg.context, seed)}


# -- model ---------------------------------------------------------------------------------------------------


def _positions(context: int, d: int) -> Any:
    """A layer adding a learned ``(context, d)`` position embedding (its weight is named ``embeddings``)."""
    import keras

    class PositionEmbedding(keras.layers.Layer):
        def build(self, input_shape: Any) -> None:
            init = keras.initializers.RandomNormal(stddev=0.02)
            self.embeddings = self.add_weight(shape=(context, d), initializer=init, name="embeddings")

        def call(self, x: Any) -> Any:
            return x + self.embeddings

    return PositionEmbedding(name="position_embedding")


def char_lm(cfg: LMConfig) -> Any:
    """The uncompiled Keras 3 model: ``tokens`` int32 ``(batch, context)`` -> logits ``(batch, context, 128)``."""
    import keras
    from keras import layers, ops

    keras.utils.set_random_seed(cfg.seed)
    d, heads, t = cfg.d_model, cfg.heads, cfg.context
    head_dim = d // heads
    tokens = keras.Input(shape=(t,), dtype="int32", name=INPUT)
    x = layers.Embedding(VOCAB, d, name="token_embedding")(tokens)
    x = _positions(t, d)(x)
    causal = np.triu(np.full((t, t), -1e9, dtype=np.float32), k=1)

    def split(z: Any) -> Any:  # (b, t, d) -> (b, heads, t, head_dim)
        return ops.transpose(ops.reshape(z, (-1, t, heads, head_dim)), (0, 2, 1, 3))

    for i in range(cfg.blocks):
        h = layers.LayerNormalization(epsilon=1e-5, name=f"ln{i}_attn")(x)
        q = split(layers.Dense(d, name=f"block{i}_q")(h))
        k = split(layers.Dense(d, name=f"block{i}_k")(h))
        v = split(layers.Dense(d, name=f"block{i}_v")(h))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head_dim) + causal
        att = ops.matmul(ops.softmax(scores, axis=-1), v)
        att = ops.reshape(ops.transpose(att, (0, 2, 1, 3)), (-1, t, d))
        x = x + layers.Dense(d, name=f"block{i}_o")(att)
        h = layers.LayerNormalization(epsilon=1e-5, name=f"ln{i}_mlp")(x)
        h = layers.Dense(4 * d, activation="gelu", name=f"block{i}_fc1")(h)
        x = x + layers.Dense(d, name=f"block{i}_fc2")(h)
    x = layers.LayerNormalization(epsilon=1e-5, name="ln_final")(x)
    logits = layers.Dense(VOCAB, name="head")(x)
    return keras.Model(tokens, logits, name="char_lm")


def build_char_lm(root: Path, cfg: LMConfig, python: str) -> dict[str, Any]:
    """A ``cached_model`` builder (``python`` only keys the cache: the corpus is that interpreter's stdlib):
    train, then ``root/saved_model`` and the held-out perplexity measured on it."""
    import keras

    data = corpus(cfg)
    model = char_lm(cfg)
    decay = keras.optimizers.schedules.CosineDecay(
        0.0, cfg.steps, alpha=0.05, warmup_target=cfg.learning_rate, warmup_steps=min(200, cfg.steps // 5)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(decay, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seqs = windows(data["train"], cfg.steps * cfg.batch, cfg.context + 1, cfg.seed)
    tick = time.perf_counter()
    history = model.fit(seqs[:, :-1], seqs[:, 1:], batch_size=cfg.batch, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - tick
    model.export(str(root / "saved_model"), verbose=False)
    ppl = perplexity(root / "saved_model", cfg)
    return {
        "config": asdict(cfg),
        "python": python,
        "params": int(model.count_params()),
        "corpus": {k: data[k] for k in ("files", "chars", "stdlib", "python")},
        "final_train_loss": float(history.history["loss"][-1]),
        "train_s": seconds,
        "held_out_perplexity": ppl,
    }


def cached_char_lm(cfg: LMConfig, cache_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    from tests.support.model_cache import cached_model

    return cached_model(build_char_lm, cfg, platform.python_version(), cache_dir=cache_dir)


# -- scoring -------------------------------------------------------------------------------------------------


def perplexity(saved_model: Path, cfg: LMConfig, count: int = 256, batch: int = 64) -> float:
    """Held-out perplexity of a SavedModel's ``serving_default`` (first ``count`` windows)."""
    import tensorflow as tf

    held = eval_windows(corpus(cfg)["held_out"], cfg.context, count)
    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    total, n = 0.0, 0
    for start in range(0, len(held), batch):
        chunk = held[start : start + batch]
        out = fn(**{INPUT: tf.constant(chunk[:, :-1])})
        logits = next(iter(out.values())).numpy().astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = chunk[:, 1:]
        total -= float(np.take_along_axis(logp, target[..., None], axis=-1).sum())
        n += target.size
    return math.exp(total / n)
