"""The pipeline's stages, shared by every job kind (``worker.kinds``) and the K-fold runner.

``job`` holds what the stages share (the bound datasets, the job state, the progress window); then, in the
order a run uses them: ``load`` (bind datasets, preprocessing, seeds), ``memory`` (will the prune fit?),
``evaluate`` (scores, fidelity, weights and MACs), ``latency``, ``crossval`` (K folds), ``prune`` (variables,
pruner, schedule, fine-tuning), ``compact`` (removed channels physically gone) and ``export`` (TFLite, ONNX).
``worker.pipeline`` runs them in that order.
"""
