"""Tiny real graphs (built once per session) for the structure tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.structure import builders


@pytest.fixture(scope="session")
def structure_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("structure")


@pytest.fixture(scope="session")
def mlp_dir(structure_root: Path) -> Path:
    return builders.keras3_mlp(structure_root / "mlp")


@pytest.fixture(scope="session")
def resnet_dir(structure_root: Path) -> Path:
    return builders.keras3_resnet(structure_root / "resnet")


@pytest.fixture(scope="session")
def model_dirs(structure_root: Path) -> dict[str, Path]:
    """Lazily built directories of the coverage models, by kind."""
    return _Lazy(structure_root)


class _Lazy(dict):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, kind: str) -> Path:
        if kind.startswith("recurrent:"):  # any kind builders.keras3_recurrent knows
            path = builders.keras3_recurrent(self.root / kind.replace(":", "_"), kind.split(":", 1)[1])
            self[kind] = path
            return path
        path = BUILDERS[kind](self.root / kind)
        self[kind] = path
        return path


BUILDERS = {
    "densenet": builders.keras3_densenet,
    "mobilenet": builders.keras3_mobilenet,
    "squeeze_excite": builders.keras3_squeeze_excite,
    "conv1d": builders.keras3_conv1d,
    "keras2_fused_bn": builders.keras2_fused_bn,
    "tf_module_dict": builders.tf_module_dict,
    "sequence": builders.keras3_sequence,
    "token_mlp": builders.keras3_token_mlp,
    "autoencoder": builders.keras3_autoencoder,
    "unusual_ops": builders.tf_module_unusual_ops,
    "einsum_dense": builders.keras3_einsum_dense,
    "transformer": builders.keras3_transformer,
    "transformer_dynamic": lambda out: builders.keras3_transformer(out, dynamic=True),
    "keras2_attention": builders.keras2_attention,
    "gqa": builders.keras3_gqa,
    "tf_module_attention": builders.tf_module_attention,
    "masked_attention": builders.keras3_masked_attention,
    "masked_attention_dynamic": lambda out: builders.keras3_masked_attention(out, dynamic=True),
    "per_head_mask": lambda out: builders.keras3_masked_attention(out, mask="per_head"),
    "keras2_masked_attention": builders.keras2_masked_attention,
    "tf_module_masked_attention": builders.tf_module_masked_attention,
    "select": builders.tf_module_select,
    "fused_split": builders.tf_module_fused_split,
    "grouped_conv": builders.keras3_grouped_conv,
    "tf_module_grouped_conv": builders.tf_module_grouped_conv,
}
