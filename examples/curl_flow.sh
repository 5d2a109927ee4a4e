#!/usr/bin/env bash
# Prune the demo digits CNN to 80% through the HTTP API with curl, then download the model and its metrics.
# Run from the repository root while `make serve` runs: examples/curl_flow.sh  (needs curl and python3)
set -euo pipefail
URL=${SECATEURS_URL:-http://127.0.0.1:8000}
DEMO=${DEMO_DIR:-demo}
AUTH=(); [[ -z ${SECATEURS_API_KEY:-} ]] || AUTH=(-H "Authorization: Bearer $SECATEURS_API_KEY")
api() { curl -sS --fail-with-body "${AUTH[@]}" "$@"; }
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# A tiny model and datasets (scikit-learn's bundled digits, offline): model.zip, train.npz, test.npz
[[ -f $DEMO/model.zip ]] || "${PYTHON:-.venv/bin/python}" -m tests.support.model_factory demo "$DEMO"

MODEL=$(api -F file=@"$DEMO/model.zip" -F name=digits-cnn "$URL/v1/models" | field id)    # 201, validating
TRAIN=$(api -F file=@"$DEMO/train.npz" "$URL/v1/datasets" | field id)                     # 201 with shapes
TEST=$(api -F file=@"$DEMO/test.npz" "$URL/v1/datasets" | field id)

# 202 + Location. With a train dataset and no recipe given, the "recommended" preset applies.
JOB=$(api -H 'content-type: application/json' "$URL/v1/jobs" -d '{"model_id": "'"$MODEL"'",
  "train_dataset_id": "'"$TRAIN"'", "eval_dataset_id": "'"$TEST"'", "spec": {"target_sparsity": 0.8}}' | field id)

while :; do                                    # queued -> running (stage, progress) -> succeeded | failed
  STATUS=$(api "$URL/v1/jobs/$JOB" | field status); echo "$JOB: $STATUS"
  case $STATUS in succeeded) break ;; failed|canceled) api "$URL/v1/jobs/$JOB"; exit 1 ;; esac
  sleep 2
done

api -o pruned.zip "$URL/v1/jobs/$JOB/artifact"        # a SavedModel zip, same signatures, exact zeros
api -o metrics.json "$URL/v1/jobs/$JOB/metrics"       # baseline vs pruned: accuracy, sparsity, size, ...
python3 - <<'PY'
import json
m = json.load(open("metrics.json"))
b, p = m["baseline"], m["pruned"]
print("accuracy %.3f -> %.3f, sparsity %.2f, zip %.1f KB -> %.1f KB" % (b["metrics"]["accuracy"],
      p["metrics"]["accuracy"], p["sparsity"], b["size_bytes"]["zip"] / 1024, p["size_bytes"]["zip"] / 1024))
PY
