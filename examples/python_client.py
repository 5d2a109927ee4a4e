"""Prune the demo digits CNN to 80% with the Python client, then download the model and its metrics.

Run from the repository root while `make serve` runs: .venv/bin/python examples/python_client.py
The client (app.client) needs only httpx. Server: SECATEURS_URL; key: SECATEURS_API_KEY once keys exist.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from app.client import Client

demo = Path(os.environ.get("DEMO_DIR", "demo"))
if not (demo / "model.zip").exists():  # a tiny model and datasets (scikit-learn's bundled digits, offline)
    subprocess.run([sys.executable, "-m", "tests.support.model_factory", "demo", str(demo)], check=True)

url = os.environ.get("SECATEURS_URL", "http://127.0.0.1:8000")
with Client(url, api_key=os.environ.get("SECATEURS_API_KEY")) as client:
    model = client.upload_model(demo / "model.zip", name="digits-cnn")  # also .tar.gz / .keras
    train, test = client.upload_dataset(demo / "train.npz"), client.upload_dataset(demo / "test.npz")
    # With a train dataset and no recipe given, the "recommended" preset applies; job.spec shows what ran.
    job = client.create_job(model.id, {"target_sparsity": 0.8}, train_dataset_id=train.id,
                            eval_dataset_id=test.id, idempotency_key=f"example-{model.id}")
    job = job.wait(timeout=900, on_progress=lambda j: print(j.status, j.stage, f"{j.progress:.0%}"))
    client.download_artifact(job.id, "pruned.zip")  # checks length and SHA-256; resumes with Range
    metrics = client.metrics(job.id)
Path("metrics.json").write_text(json.dumps(metrics, indent=2))  # baseline vs pruned: accuracy, size, ...

base, pruned = metrics["baseline"], metrics["pruned"]
print(f"accuracy {base['metrics']['accuracy']:.3f} -> {pruned['metrics']['accuracy']:.3f},",
      f"sparsity {pruned['sparsity']:.2f}, zip {base['size_bytes']['zip'] / 1024:.1f} KB ->",
      f"{pruned['size_bytes']['zip'] / 1024:.1f} KB")
