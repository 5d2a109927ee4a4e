"""Pruning from calibration data: what each weight's op receives (``capture``), Wanda scores (``wanda``),
SparseGPT's optimal-brain-surgeon updates (``sparsegpt``). Numbers in, numbers out: no Celery, no store."""
