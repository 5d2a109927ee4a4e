"""Prune the demo digits CNN on the same data in three forms: TFRecord shards registered by reference,
a Parquet file and a zipped PNG image folder (both uploaded).

Run from the repository root: .venv/bin/python examples/bring_your_data.py, while the server runs with
SECATEURS_DATASET_SOURCES='{"*": ["file:///abs/path/data-root/"]}' naming the folder DATA_ROOT (./data-root).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from app.client import Client

demo = Path(os.environ.get("DEMO_DIR", "demo"))
if not (demo / "model.zip").exists():  # a tiny model and datasets (scikit-learn's bundled digits, offline)
    subprocess.run([sys.executable, "-m", "tests.support.model_factory", "demo", str(demo)], check=True)
root = Path(os.environ.get("DATA_ROOT", "data-root")).resolve()  # the server reads the shards from here


def write_tfrecords(x: np.ndarray, y: np.ndarray, folder: Path, shards: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tf.io.TFRecordWriter(str(folder / f"part-{s:05d}.tfrecord")) as writer:
            for i in range(s, len(x), shards):
                feature = {"pixels": tf.train.Feature(float_list=tf.train.FloatList(value=x[i].ravel())),
                           "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[y[i]]))}
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())


def write_parquet(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)  # one row = one 8x8x1 image
    pq.write_table(pa.table({"pixels": pixels, "label": pa.array(y)}), path)


def write_png_folder_zip(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:  # <class>/<image>.png; the class names are the folder names
        for i in range(len(x)):
            png = tf.io.encode_png(np.round(x[i] * 255).astype(np.uint8)).numpy()
            zf.writestr(f"digit_{y[i]}/{i:05d}.png", png)


for split in ("train", "test"):
    data = np.load(demo / f"{split}.npz")  # x: float32 [n, 8, 8, 1] in [0, 1], y: int labels
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    write_tfrecords(x, y, root / f"tfrecord-{split}")
    write_parquet(x, y, root / f"{split}.parquet")
    write_png_folder_zip(x, y, root / f"{split}-png.zip")

FEATURES = {"pixels": {"kind": "fixed", "dtype": "float32", "shape": [8, 8, 1]},
            "label": {"kind": "fixed", "dtype": "int64", "shape": []}}
PARQUET = {"inputs": {"x": {"column": "pixels", "shape": [8, 8, 1]}}, "label": "label"}

url = os.environ.get("SECATEURS_URL", "http://127.0.0.1:8000")
with Client(url, api_key=os.environ.get("SECATEURS_API_KEY")) as client:
    model = client.upload_model(demo / "model.zip", name="digits-cnn")
    forms = {  # form -> how to register one split; the server reads a sample and answers ready or invalid
        "tfrecord": lambda split: client.register_dataset(  # by reference: only the URI is sent
            f"file://{root}/tfrecord-{split}/", format="tfrecord", features=FEATURES,
            inputs={"x": {"feature": "pixels"}}, label="label"),
        "parquet": lambda split: client.upload_dataset(root / f"{split}.parquet", description=PARQUET),
        "images": lambda split: client.upload_dataset(root / f"{split}-png.zip"),  # class = folder name
    }
    for form, register in forms.items():
        train = client.wait_dataset(register("train").id, timeout=600)  # DatasetInvalid says why if refused
        test = client.wait_dataset(register("test").id, timeout=600)
        spec = {"target_sparsity": 0.8, "preset": "fast"}
        if form == "images":  # decoded images are float32 in [0, 255]; the model was trained on [0, 1]
            spec["preprocessing"] = {"scale": 1 / 255}
        job = client.create_job(model.id, spec, train_dataset_id=train.id, eval_dataset_id=test.id).wait(900)
        base, pruned = (client.metrics(job.id)[k]["metrics"]["accuracy"] for k in ("baseline", "pruned"))
        size = f"{train.n_samples} samples, {train.shards} shards"
        print(f"{form}: accuracy {base:.3f} -> {pruned:.3f} ({size})")
