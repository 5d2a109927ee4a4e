"""Numbers in, numbers out: quality metrics, fidelity, cross-validation folds, latency, sizes and MACs.

No TensorFlow, Celery, FastAPI or database here (a test checks the imports), so everything is tested on plain
arrays and scikit-learn models: ``metrics`` (per-output quality metrics), ``fidelity`` (baseline vs pruned
agreement, no labels needed), ``crossval`` (K-fold plans and summaries), ``latency`` (interleaved timing),
``size`` (bytes, zips, weight counts) and ``flops`` (dense vs effective multiply-accumulates).
"""
