"""Op audit: refuse SavedModels whose callable graphs touch files or run Python.

Every SavedModel carries SaveV2/RestoreV2/MergeV2Checkpoints in its checkpoint saver functions, so scanning
the whole function library would flag every model. We scan only what can run in the worker: the graphs
reachable from the signatures (including ``__saved_model_init_op``), the restored Keras ``__call__`` (used for
training-mode fine-tuning) and resource initialisers that ``tf.saved_model.load`` runs. From each root we
follow function calls: ``f`` of (Stateful)PartitionedCall, every function-valued attr (If/While/Case branches,
dataset map functions) and nodes whose op is itself a library function. The proto is read without loading the
model, so the audit can run before anything executes.

Known gap: table initialisers from text files (InitializeTableFromTextFileV2) are allowed, because legitimate
vocabularies read the model's own assets this way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tensorflow.core.protobuf import saved_model_pb2

from worker.errors import PipelineError
from worker.models.handle import ModelHandle

DENIED_OPS: frozenset[str] = frozenset(
    {
        # files and checkpoints
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "SaveV2",
        "Save",
        "SaveSlices",
        "RestoreV2",
        "Restore",
        "RestoreSlice",
        "MergeV2Checkpoints",
        "ImmutableConst",
        "LoadAndRemapMatrix",
        "GenerateVocabRemapping",
        "RecordInput",
        "FileSystemSetConfiguration",
        # Python
        "PyFunc",
        "PyFuncStateless",
        "EagerPyFunc",
        # file-reading datasets and readers
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "TextLineDataset",
        "CSVDataset",
        "CSVDatasetV2",
        "ExperimentalCSVDataset",
        "SqlDataset",
        "ExperimentalSqlDataset",
        "LMDBDataset",
        "ExperimentalLMDBDataset",
        "MatchingFilesDataset",
        "ExperimentalMatchingFilesDataset",
        "LoadDataset",
        "SaveDataset",
        "SaveDatasetV2",
        "SnapshotDataset",
        "SnapshotDatasetV2",
        "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "DistributedSave",
        "DataServiceDataset",
        "DataServiceDatasetV2",
        "DataServiceDatasetV3",
        "DataServiceDatasetV4",
        "RegisterDataset",
        "RegisterDatasetV2",
        "TFRecordReader",
        "TFRecordReaderV2",
        "TextLineReader",
        "TextLineReaderV2",
        "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2",
        "WholeFileReader",
        "WholeFileReaderV2",
        "LMDBReader",
        "IdentityReader",
        "IdentityReaderV2",
        # debugging and summaries (write to disk or network)
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugIdentityV3",
        "DebugNanCount",
        "DebugNumericSummary",
        "DebugNumericSummaryV2",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "WriteSummary",
        "WriteScalarSummary",
        "WriteHistogramSummary",
        "WriteImageSummary",
        "WriteAudioSummary",
        "WriteGraphSummary",
        "WriteRawProtoSummary",
        "ImportEvent",
    }
)
# Object-graph children that run when the model is loaded or that the worker calls besides the signatures.
_EXTRA_ROOTS = frozenset({"__call__", "_initialize", "_create_resource"})
_FILE_STREAM = b"file://"


def _functions_of_attr(value: Any) -> Iterable[str]:
    if value.HasField("func"):
        yield value.func.name
    if value.HasField("list"):
        for fn in value.list.func:
            yield fn.name


def _flag(node: Any) -> str | None:
    if node.op in DENIED_OPS:
        return node.op
    stream = node.attr["output_stream"].s if "output_stream" in node.attr else b""
    if node.op == "PrintV2" and stream.startswith(_FILE_STREAM):
        return "PrintV2(output_stream=file)"
    return None


class _Walker:
    """Collect denied op types in the functions reachable from a set of roots."""

    def __init__(self, meta_graph: Any) -> None:
        self.library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
        self.main = {n.name: n for n in meta_graph.graph_def.node}
        self.found: set[str] = set()
        self._seen_functions: set[str] = set()

    def _visit_node(self, node: Any) -> list[str]:
        flagged = _flag(node)
        if flagged:
            self.found.add(flagged)
        called = [node.op] if node.op in self.library else []
        for value in node.attr.values():
            called.extend(_functions_of_attr(value))
        return called

    def function(self, name: str) -> None:
        pending = [name]
        while pending:
            fname = pending.pop()
            if fname in self._seen_functions or fname not in self.library:
                continue
            self._seen_functions.add(fname)
            for node in self.library[fname].node_def:
                pending.extend(self._visit_node(node))

    def main_graph_from(self, tensor_names: Iterable[str]) -> None:
        """Walk the main graph backwards from signature outputs, entering every function a node calls."""
        pending = [_node_name(t) for t in tensor_names]
        seen: set[str] = set()
        while pending:
            name = pending.pop()
            if name in seen or name not in self.main:
                continue
            seen.add(name)
            node = self.main[name]
            for fname in self._visit_node(node):
                self.function(fname)
            pending.extend(_node_name(i) for i in node.input)


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _tensor_names(info: Any) -> Iterable[str]:
    """Graph tensor names behind a signature TensorInfo (dense, sparse or composite)."""
    encoding = info.WhichOneof("encoding")
    if encoding == "name":
        yield info.name
    elif encoding == "coo_sparse":
        sparse = info.coo_sparse
        yield from (sparse.values_tensor_name, sparse.indices_tensor_name, sparse.dense_shape_tensor_name)
    elif encoding == "composite_tensor":
        for component in info.composite_tensor.components:
            yield from _tensor_names(component)


def _extra_root_functions(object_graph: Any) -> Iterable[str]:
    nodes = object_graph.nodes
    for node in nodes:
        for child in node.children:
            if child.local_name not in _EXTRA_ROOTS:
                continue
            target = nodes[child.node_id]
            kind = target.WhichOneof("kind")
            if kind == "function":
                yield from target.function.concrete_functions
            elif kind == "bare_concrete_function":
                yield target.bare_concrete_function.concrete_function_name


def audit_saved_model(path: Path) -> list[str]:
    """Sorted denied op types reachable from what the worker runs; empty means clean. Reads only the proto."""
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except (OSError, ValueError) as exc:  # DecodeError is a ValueError
        raise PipelineError("model_load_failed", f"saved_model.pb is unreadable: {exc}") from exc
    found: set[str] = set()
    for meta_graph in proto.meta_graphs:
        walker = _Walker(meta_graph)
        outputs = [
            name
            for sig in meta_graph.signature_def.values()
            for info in sig.outputs.values()
            for name in _tensor_names(info)
        ]
        walker.main_graph_from(outputs)
        for fname in _extra_root_functions(meta_graph.object_graph_def):
            walker.function(fname)
        found |= walker.found
    return sorted(found)


def audit_ops(handle: ModelHandle) -> list[str]:
    """``audit_saved_model`` for a loaded handle."""
    return audit_saved_model(handle.path)
