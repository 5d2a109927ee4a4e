"""Benchmarks for Secateurs (not tests): ``python -m bench.run [--only resnet|digits] [--smoke]``."""
