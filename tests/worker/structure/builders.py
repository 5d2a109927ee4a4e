"""Builders of small real models for the structure tests (each exports a SavedModel directory)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.model_cache import cached_builder


def _export(model: Any, out_dir: Path) -> Path:
    model.export(str(out_dir), verbose=False)
    return out_dir


@cached_builder
def keras3_mlp(out_dir: Path) -> Path:
    """Dense 20 -> 16 relu -> 12 sigmoid -> 5: a sigmoid leaves 0.5 behind in a removed unit."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((20,), name="features")
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    x = keras.layers.Dense(12, activation="sigmoid", name="gate")(x)
    out = keras.layers.Dense(5, name="logits")(x)
    return _export(keras.Model(inp, out), out_dir)


def _conv_bn(x: Any, filters: int, kernel: int, name: str, bias: bool = False, strides: int = 1) -> Any:
    import keras

    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=bias, name=name)(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


@cached_builder
def keras3_resnet(out_dir: Path) -> Path:
    """Stem conv+BN, one identity residual block (Add), a 1x1 strided projection, GAP, Dense."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="image")
    x = keras.layers.ReLU()(_conv_bn(inp, 8, 3, "stem"))
    y = keras.layers.ReLU()(_conv_bn(x, 6, 3, "block_a", bias=True))
    y = _conv_bn(y, 8, 3, "block_b")
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.ReLU()(_conv_bn(x, 10, 1, "proj", strides=2))
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, activation="softmax", name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_densenet(out_dir: Path) -> Path:
    """DenseNet-like: every block concatenates its input with new features; BN over the concatenation."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((10, 10, 3), name="image")
    x = keras.layers.ReLU()(_conv_bn(inp, 6, 3, "stem"))
    for i in range(2):
        y = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"pre{i}_bn")(x))
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"grow{i}")(y)
        x = keras.layers.Concatenate(name=f"cat{i}")([x, y])
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="trans_bn")(x))
    x = keras.layers.Conv2D(8, 1, name="trans")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_mobilenet(out_dir: Path) -> Path:
    """Inverted residuals: expand 1x1 -> depthwise 3x3 -> project 1x1, residual Add when shapes match."""
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.ReLU(6.0)(_conv_bn(inp, 8, 3, "stem", strides=2))

    def block(x: Any, expand: int, out: int, name: str, strides: int = 1) -> Any:
        y = keras.layers.ReLU(6.0)(_conv_bn(x, expand, 1, f"{name}_expand"))
        y = keras.layers.DepthwiseConv2D(
            3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw"
        )(y)
        y = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(name=f"{name}_dw_bn")(y))
        y = _conv_bn(y, out, 1, f"{name}_project")
        if strides == 1 and x.shape[-1] == out:
            y = keras.layers.Add(name=f"{name}_add")([x, y])
        return y

    x = block(x, 16, 8, "b1")
    x = block(x, 24, 12, "b2", strides=2)
    x = block(x, 24, 12, "b3")
    x = keras.layers.SeparableConv2D(10, 3, padding="same", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_squeeze_excite(out_dir: Path) -> Path:
    """EfficientNet-like: swish, squeeze-excite gate (GAP -> 1x1 reduce -> 1x1 expand -> sigmoid -> Mul)."""
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Activation("swish")(_conv_bn(inp, 12, 3, "stem"))
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    s = keras.layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = keras.layers.Conv2D(12, 1, activation="sigmoid", name="se_expand")(s)
    x = keras.layers.Multiply()([x, s])
    x = _conv_bn(x, 8, 1, "project")
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_conv1d(out_dir: Path) -> Path:
    """Conv1D stack on sequences (Keras lowers it to ExpandDims + Conv2D + Squeeze), Flatten, Dense."""
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((12, 4), name="signal")
    x = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv1D(6, 3, padding="valid", activation="tanh", name="c2")(x)
    x = keras.layers.MaxPooling1D(2)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras2_fused_bn(out_dir: Path) -> Path:
    """tf_keras (Keras 2) CNN with BatchNorm (FusedBatchNormV3 in the graph), saved with model.save."""
    import tf_keras

    tf_keras.utils.set_random_seed(5)
    layers = tf_keras.layers
    inp = layers.Input((8, 8, 2), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = layers.ReLU()(layers.BatchNormalization(name="bn")(x))
    y = layers.Conv2D(8, 1, name="conv_b")(x)
    x = layers.Add()([x, y])
    x = layers.Conv2D(6, 3, padding="valid", activation="relu", name="conv_c")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(10, activation="relu", name="dense")(x)
    out = layers.Dense(3, activation="softmax", name="out")(x)
    model = tf_keras.Model(inp, out)
    model.save(str(out_dir))
    return out_dir


@cached_builder
def tf_module_dict(out_dir: Path) -> Path:
    """A plain tf.Module whose signatures take and return dicts: two inputs, two outputs, two signatures."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(6)

    def var(shape: list[int], name: str) -> tf.Variable:
        return tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.3, name=name)

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = var([6, 10], "Variable")
            self.b1 = var([10], "Variable")
            self.w2 = var([10, 8], "Variable")
            self.scale = var([8], "Variable")
            self.w3 = var([8 + 3, 4], "Variable")

        def trunk(self, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
            h = tf.nn.elu(tf.matmul(a, self.w1) + self.b1)
            h = tf.nn.relu(tf.matmul(h, self.w2) * self.scale)
            return tf.matmul(tf.concat([h, b], axis=-1), self.w3)

    module = Model()
    specs = {
        "a": tf.TensorSpec([None, 6], tf.float32, name="a"),
        "b": tf.TensorSpec([None, 3], tf.float32, name="b"),
    }

    @tf.function(input_signature=[specs])
    def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = module.trunk(inputs["a"], inputs["b"])
        return {"logits": logits, "probs": tf.nn.softmax(logits)}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 6], tf.float32, name="a"),
            tf.TensorSpec([None, 3], tf.float32, name="b"),
        ]
    )
    def score(a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"score": tf.reduce_sum(module.trunk(a, b), axis=-1)}

    module.serve, module.score = serve, score
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve, "score": score})
    return out_dir


@cached_builder
def keras3_sequence(out_dir: Path) -> Path:
    """Embedding-free sequence model: Dense -> LSTM -> self-attention -> LayerNorm -> Dense."""
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((6, 5), name="tokens")
    x = keras.layers.Dense(8, activation="relu", name="embed")(inp)
    x = keras.layers.LSTM(8, return_sequences=True, name="lstm")(x)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attn")(x, x)
    x = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([x, a]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(2, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_token_mlp(out_dir: Path) -> Path:
    """Dense layers on [batch, time, features] inputs: Keras 3 lowers them to Tensordot (a dynamic reshape)."""
    import keras

    keras.utils.set_random_seed(8)
    inp = keras.Input((6, 5), name="tokens")
    x = keras.layers.Dense(8, activation="relu", name="embed")(inp)
    x = keras.layers.Dense(7, activation="sigmoid", name="ffn")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(2, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_autoencoder(out_dir: Path) -> Path:
    """Conv -> strided conv -> Conv2DTranspose (up-sampling) -> 1x1 conv to one output channel."""
    import keras

    keras.utils.set_random_seed(9)
    inp = keras.Input((8, 8, 2), name="image")
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="enc1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="enc2")(x)
    x = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", activation="relu", name="dec")(x)
    out = keras.layers.Conv2D(1, 1, name="recon")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def tf_module_unusual_ops(out_dir: Path) -> Path:
    """A plain module whose channels pass ops with no rule or with a channel-mixing meaning: roll along the
    channels, padding of the channel axis, softmax and a sum over channels; one clean branch beside them."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(10)

    def var(shape: list[int], name: str) -> tf.Variable:
        return tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.4, name=name)

    class Odd(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.roll_w, self.roll_b, self.roll_out = (
                var([6, 10], "roll_w"),
                var([10], "roll_b"),
                var([10, 3], "roll_out"),
            )
            self.pad_w, self.pad_out = var([6, 8], "pad_w"), var([10, 3], "pad_out")
            self.soft_w, self.soft_out = var([6, 5], "soft_w"), var([5, 3], "soft_out")
            self.sum_w = var([6, 7], "sum_w")
            self.clean_w, self.clean_b, self.clean_out = (
                var([6, 9], "clean_w"),
                var([9], "clean_b"),
                var([9, 3], "clean_out"),
            )

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            rolled = tf.roll(tf.nn.relu(x @ self.roll_w + self.roll_b), shift=1, axis=-1) @ self.roll_out
            padded = tf.pad(tf.nn.relu(x @ self.pad_w), [[0, 0], [0, 2]]) @ self.pad_out
            soft = tf.nn.softmax(x @ self.soft_w) @ self.soft_out
            summed = tf.reduce_sum(tf.nn.relu(x @ self.sum_w), axis=-1, keepdims=True)
            clean = tf.nn.relu(x @ self.clean_w + self.clean_b) @ self.clean_out
            return {"y": rolled + padded + soft + summed + clean}

    module = Odd()
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.serve})
    return out_dir


@cached_builder
def keras3_einsum_dense(out_dir: Path) -> Path:
    """EinsumDense ``abc,cd->abd`` with a bias on ``d`` between two Dense layers on sequences."""
    import keras

    keras.utils.set_random_seed(11)
    inp = keras.Input((4, 5), name="tokens")
    x = keras.layers.Dense(8, activation="relu", name="embed")(inp)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), bias_axes="d", name="mix")(x)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(2, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras3_transformer(out_dir: Path, dynamic: bool = False) -> Path:
    """A transformer block: MultiHeadAttention (4 heads of 4), residual + LayerNorm, a GELU MLP and a gated
    (SiLU x up) MLP. ``dynamic``: unknown sequence length (Keras 3 then keeps the EinsumDense Einsum ops)."""
    import keras

    keras.utils.set_random_seed(11)
    inp = keras.Input((None if dynamic else 6, 8), name="tokens")
    x = keras.layers.Dense(16, name="embed")(inp)
    a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4, name="attn")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(x + a)
    h = keras.layers.Dense(32, activation="gelu", name="ffn1")(x)
    x = keras.layers.LayerNormalization(name="ln2")(x + keras.layers.Dense(16, name="ffn2")(h))
    g = keras.layers.Dense(24, activation="silu", name="gate")(x)
    u = keras.layers.Dense(24, name="up")(x)
    x = keras.layers.LayerNormalization(name="ln3")(x + keras.layers.Dense(16, name="down")(g * u))
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


@cached_builder
def keras2_attention(out_dir: Path) -> Path:
    """tf_keras MultiHeadAttention (EinsumDense ``abc,cde->abde`` / ``abcd,cde->abe``), saved with model.save."""
    import tf_keras

    tf_keras.utils.set_random_seed(12)
    layers = tf_keras.layers
    inp = layers.Input((5, 8), name="tokens")
    x = layers.Dense(12, name="embed")(inp)
    a = layers.MultiHeadAttention(num_heads=3, key_dim=4, name="attn")(x, x)
    x = layers.LayerNormalization(name="ln")(layers.Add()([x, a]))
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(2, name="head")(x)
    model = tf_keras.Model(inp, out)
    model.save(str(out_dir))
    return out_dir


@cached_builder
def keras3_gqa(out_dir: Path) -> Path:
    """Grouped-query attention: 4 query heads share 2 key/value heads (Keras 3 ``GroupQueryAttention``)."""
    import keras

    keras.utils.set_random_seed(13)
    inp = keras.Input((6, 8), name="tokens")
    x = keras.layers.Dense(16, name="embed")(inp)
    a = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2, name="gqa")(
        x, x
    )
    x = keras.layers.LayerNormalization(name="ln")(x + a)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    return _export(keras.Model(inp, out), out_dir)


def _attention_module(seed: int) -> tuple[Any, Callable[..., Any]]:
    """A tf.Module holding the weights of ``tf_module_attention`` (seeded) and its block
    (projections, ``q @ k^T``, the scores through ``probabilities``, ``p @ v``, merge, output, residual)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def var(shape: list[int], name: str) -> tf.Variable:
        return tf.Variable(rng.standard_normal(shape).astype("float32") * 0.3, name=name)

    class Attention(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_in, self.w_out = var([8, 16], "w_in"), var([16, 3], "w_out")
            self.wq, self.wk, self.wv, self.wo = (var([16, 16], n) for n in ("wq", "wk", "wv", "wo"))
            self.bq, self.bv = var([16], "bq"), var([16], "bv")

    module = Attention()

    def heads(t: tf.Tensor) -> tf.Tensor:
        return tf.transpose(tf.reshape(t, [-1, 6, 4, 4]), [0, 2, 1, 3])

    def block(x: tf.Tensor, probabilities: Callable[[tf.Tensor], tf.Tensor]) -> dict[str, tf.Tensor]:
        h = tf.matmul(x, module.w_in)
        q = heads(tf.matmul(h, module.wq) + module.bq)
        k = heads(tf.matmul(h, module.wk))
        v = heads(tf.matmul(h, module.wv) + module.bv)
        p = probabilities(tf.matmul(q, k, transpose_b=True) * 0.5)
        o = tf.reshape(tf.transpose(tf.matmul(p, v), [0, 2, 1, 3]), [-1, 6, 16])
        y = tf.matmul(o, module.wo) + h
        return {"out": tf.matmul(tf.reduce_mean(y, axis=1), module.w_out)}

    return module, block


@cached_builder
def tf_module_attention(out_dir: Path) -> Path:
    """Attention written with tf.matmul in a plain tf.Module: 2-D projections reshaped to 4 heads of 4,
    transposed to [B, H, T, D], ``q @ k^T`` and ``p @ v``, transposed back, merged, projected, residual."""
    import tensorflow as tf

    module, block = _attention_module(14)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 8], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return block(x, tf.nn.softmax)

    module.serve = serve
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    return out_dir


@cached_builder
def keras3_masked_attention(out_dir: Path, mask: str = "padding", dynamic: bool = False) -> Path:
    """Token ids -> Embedding -> MultiHeadAttention (4 heads of 4) called with an attention mask -> residual +
    LayerNorm -> pooled head. ``mask``: ``"padding"``, ``token_ids != 0`` as ``[B, 1, T]`` (Keras applies it
    with ``SelectV2`` whose condition is the same for every head); ``"per_head"``, a second input
    ``[B, 4, T, T]`` (the condition carries the heads axis). ``dynamic``: unknown sequence length."""
    import keras

    keras.utils.set_random_seed(15)
    seq = None if dynamic else 6
    ids = keras.Input((seq,), dtype="int32", name="token_ids")
    inputs = [ids]
    if mask == "per_head":
        attention_mask = keras.Input((4, seq, seq), dtype="bool", name="head_mask")
        inputs.append(attention_mask)
    else:
        attention_mask = keras.ops.not_equal(ids, 0)[:, None, :]
    x = keras.layers.Embedding(20, 16, name="embed")(ids)
    attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4, name="attn")
    a = attention(x, x, attention_mask=attention_mask)
    x = keras.layers.LayerNormalization(name="ln")(x + a)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    return _export(keras.Model(inputs, out), out_dir)


@cached_builder
def keras2_masked_attention(out_dir: Path) -> Path:
    """tf_keras MultiHeadAttention with a padding mask: its Softmax adds ``(1 - mask) * -1e9`` (``AddV2``)."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(16)
    layers = tf_keras.layers

    class PaddingMask(layers.Layer):
        def call(self, ids: tf.Tensor) -> tf.Tensor:
            return tf.not_equal(ids, 0)[:, None, :]

    ids = layers.Input((6,), dtype="int32", name="token_ids")
    x = layers.Embedding(20, 12, name="embed")(ids)
    attention = layers.MultiHeadAttention(num_heads=3, key_dim=4, name="attn")
    a = attention(x, x, attention_mask=PaddingMask()(ids))
    x = layers.LayerNormalization(name="ln")(layers.Add()([x, a]))
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(2, name="head")(x)
    tf_keras.Model(ids, out).save(str(out_dir))
    return out_dir


@cached_builder
def tf_module_masked_attention(out_dir: Path) -> Path:
    """Attention with tf.matmul in a plain tf.Module (as ``tf_module_attention``) under a padding mask input
    broadcast to the scores' run-time shape (``BroadcastTo``, so the heads axis is full length): the scores
    get ``(1 - mask) * -1e9`` added and the probabilities are multiplied by the mask."""
    import tensorflow as tf

    module, block = _attention_module(17)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 6, 8], tf.float32, name="x"),
            tf.TensorSpec([None, 6], tf.int32, name="mask"),
        ]
    )
    def serve(x: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        def masked(s: tf.Tensor) -> tf.Tensor:
            m = tf.broadcast_to(tf.cast(mask, tf.float32)[:, None, None, :], tf.shape(s))
            return tf.nn.softmax(s + (1.0 - m) * -1e9) * m

        return block(x, masked)

    module.serve = serve
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    return out_dir


@cached_builder
def tf_module_select(out_dir: Path) -> Path:
    """``Select`` (v1) with a vector condition picking rows of ``x @ w1``, and ``SelectV2`` whose condition is
    computed from the channels it selects (``where(g > 0, g, 0.1 * g)`` on ``x @ w3``)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(18)

    def var(shape: list[int], name: str) -> tf.Variable:
        return tf.Variable(rng.standard_normal(shape).astype("float32") * 0.3, name=name)

    class Selects(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w3 = var([8, 16], "w1"), var([8, 16], "w3")
            self.w2, self.w4 = var([16, 4], "w2"), var([16, 4], "w4")

    module = Selects()
    x_spec = tf.TensorSpec([None, 8], tf.float32, name="x")

    @tf.function(input_signature=[x_spec, tf.TensorSpec([None], tf.bool, name="rows")])
    def serve(x: tf.Tensor, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        h = tf.matmul(x, module.w1)
        g = tf.matmul(x, module.w3)
        a = tf.compat.v1.where(rows, h, -h)
        b = tf.where(g > 0, g, 0.1 * g)
        return {"out": tf.matmul(a, module.w2) + tf.matmul(b, module.w4)}

    module.serve = serve
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    return out_dir


@cached_builder
def tf_module_fused_split(out_dir: Path) -> Path:
    """A fused projection cut into three parts (``tf.split``, as a fused q/k/v or gate kernel), the parts
    mixed element-wise, and a slice of a layer's channels concatenated to it before a ``tf.ones`` kernel."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(12)

    def var(shape: list[int], name: str) -> tf.Variable:
        return tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.4, name=name)

    class Fused(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_in, self.fused, self.mid, self.mid_b = (
                var([5, 8], "w_in"),
                var([8, 24], "fused"),
                var([8, 6], "mid"),
                var([6], "mid_b"),
            )

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            a, b, c = tf.split(tf.nn.relu(x @ self.w_in) @ self.fused, 3, axis=-1)
            m = tf.nn.relu((tf.nn.relu(a) * tf.sigmoid(b) + c) @ self.mid + self.mid_b)
            return {"y": tf.concat([m, m[:, :2]], -1) @ tf.ones([8, 3])}

    module = Fused()
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.serve})
    return out_dir


@cached_builder
def keras3_recurrent(out_dir: Path, kind: str) -> Path:
    """Small recurrent models on ``[batch, 5, 3]`` (tokens ``[batch, 5]`` for the embeddings): ``kind`` names
    the layers (see ``RECURRENT_KINDS`` in ``test_recurrent.py``); every one ends in ``Dense(2, name="head")``."""
    import keras

    keras.utils.set_random_seed(11)
    layers = keras.layers
    tokens = kind.startswith("embedding")
    inp = keras.Input((5,), dtype="int32", name="tokens") if tokens else keras.Input((5, 3), name="x")
    x = layers.Embedding(10, 3, mask_zero=kind == "embedding_mask", name="embed")(inp) if tokens else inp
    outputs = []
    if kind in ("lstm", "embedding_lstm", "embedding_mask"):
        x = layers.LSTM(6, name="rnn")(x)
    elif kind == "lstm_unroll":
        x = layers.LSTM(6, unroll=True, name="rnn")(x)
    elif kind == "lstm_sequences":
        x = layers.Flatten()(layers.LSTM(6, return_sequences=True, name="rnn")(x))
    elif kind == "gru":
        x = layers.GRU(6, name="rnn")(x)
    elif kind == "gru_sequences":
        x = layers.GlobalAveragePooling1D()(layers.GRU(6, return_sequences=True, name="rnn")(x))
    elif kind == "gru_reset_before":
        x = layers.GRU(6, reset_after=False, name="rnn")(x)
    elif kind == "simple_rnn":
        x = layers.SimpleRNN(6, name="rnn")(x)
    elif kind == "stacked":
        x = layers.LSTM(4, name="rnn2")(layers.LSTM(6, return_sequences=True, name="rnn")(x))
    elif kind == "bidirectional":
        x = layers.Bidirectional(layers.LSTM(6, name="rnn"), name="bi")(x)
    elif kind == "conv1d_lstm":
        x = layers.LSTM(6, name="rnn")(layers.Conv1D(6, 2, activation="relu", name="conv")(x))
    elif kind == "initial_state":
        states = [keras.Input((6,), name="h0"), keras.Input((6,), name="c0")]
        x = layers.LSTM(6, name="rnn")(x, initial_state=states)
        inp = [inp, *states]
    elif kind == "return_state":
        x, h, _ = layers.LSTM(6, return_state=True, name="rnn")(x)
        outputs.append(h)
    else:
        raise ValueError(kind)
    out = layers.Dense(2, name="head")(x)
    return _export(keras.Model(inp, [out, *outputs] if outputs else out), out_dir)


@cached_builder
def keras3_grouped_conv(out_dir: Path) -> Path:
    """Conv2D(8) -> Conv2D(12, groups=4) + BatchNorm -> Conv2D(12, groups=4) -> 1x1 Conv2D(6) -> GAP -> Dense:
    Keras 3 runs each grouped conv as an XLA-compiled call; the two share their 4 groups."""
    import keras

    keras.utils.set_random_seed(5)
    layers = keras.layers
    x = keras.Input(shape=(8, 8, 3), name="x")
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    h = layers.Conv2D(12, 3, padding="same", groups=4, name="gc")(h)
    h = layers.ReLU()(layers.BatchNormalization(name="bn")(h))
    h = layers.Conv2D(12, 1, groups=4, activation="relu", name="gc2")(h)
    h = layers.Conv2D(6, 1, name="c3")(h)
    y = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(h))
    return _export(keras.Model(x, y), out_dir)


@cached_builder
def tf_module_grouped_conv(out_dir: Path) -> Path:
    """Grouped convs written as plain ``tf.nn.conv2d`` ops (TF 2.21's CPU kernel runs them): one with
    ``groups == cin`` (prunable, like a depthwise conv) and one in a ``jit_compile`` function with its bias
    (prunable); left whole: one in a ``jit_compile`` function that also applies a ReLU, one reading a concat
    whose parts do not line up with its groups, and 4 groups followed by 2."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(3)

    def var(*shape: int) -> Any:
        return tf.Variable(rng.standard_normal(shape).astype("float32") * 0.3)

    class Grouped(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k1, self.b1 = var(1, 1, 3, 8), var(8)
            self.kd, self.bd = var(3, 3, 1, 8), var(8)  # groups == cin == 8
            self.k3 = var(1, 1, 8, 4)
            self.k2 = var(1, 1, 3, 8)
            self.kx = var(1, 1, 2, 8)  # 4 groups, in a jit_compile call with a ReLU in its body
            self.k4 = var(1, 1, 8, 4)
            self.kc = var(1, 1, 3, 5)
            self.kcg = var(1, 1, 2, 8)  # 4 groups of 2 over a concat of 5 + 3 channels
            self.k5, self.kb, self.bb, self.k6 = var(1, 1, 3, 8), var(3, 3, 4, 6), var(6), var(1, 1, 6, 4)
            self.k7, self.kg4, self.kg2 = var(1, 1, 3, 8), var(1, 1, 2, 8), var(1, 1, 4, 8)

        @tf.function(jit_compile=True)
        def _xla(self, h: Any) -> Any:
            return tf.nn.relu(tf.nn.conv2d(h, self.kx, 1, "SAME"))

        @tf.function(jit_compile=True)
        def _xla_bias(self, h: Any) -> Any:  # 2 groups: 4 -> 3 channels each, bias inside the call
            return tf.nn.bias_add(tf.nn.conv2d(h, self.kb, 1, "SAME"), self.bb)

        @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32, name="x")])
        def __call__(self, x: Any) -> dict[str, Any]:
            h = tf.nn.relu(tf.nn.conv2d(x, self.k1, 1, "SAME") + self.b1)
            d = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, self.kd, 1, "VALID"), self.bd))
            y = tf.reduce_mean(tf.nn.conv2d(d, self.k3, 1, "VALID"), [1, 2])
            z = tf.nn.conv2d(self._xla(tf.nn.conv2d(x, self.k2, 1, "SAME")), self.k4, 1, "VALID")
            c = tf.concat([tf.nn.conv2d(x, self.kc, 1, "SAME"), x], -1)
            w = tf.nn.conv2d(c, self.kcg, 1, "SAME")
            b = tf.nn.relu(self._xla_bias(tf.nn.relu(tf.nn.conv2d(x, self.k5, 1, "SAME"))))
            y += tf.reduce_mean(tf.nn.conv2d(b, self.k6, 1, "VALID"), [1, 2])
            m = tf.nn.conv2d(
                tf.nn.conv2d(tf.nn.conv2d(x, self.k7, 1, "SAME"), self.kg4, 1, "SAME"), self.kg2, 1, "SAME"
            )
            return {
                "y": y + tf.reduce_mean(z, [1, 2]),
                "w": tf.reduce_mean(w, [1, 2]) + tf.reduce_mean(m, [1, 2]),
            }

    module = Grouped()
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.__call__})
    return out_dir
