"""Datasets as streams (no Celery, no database): ``sources`` (file://, s3://, blob: roots), ``cache`` (the
worker's shard cache), ``manifest`` (what a dataset is, built once at registration), ``convert`` (archives,
image folders and large .npz into TFRecord shards), ``errors``; and the reader side: ``description``,
``stream``, ``augment``, ``split``, ``parquet``. TensorFlow is imported inside the functions that need it."""
