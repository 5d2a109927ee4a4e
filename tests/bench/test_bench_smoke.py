"""The benchmark's smoke variant end to end (real `secateurs serve` subprocess, real HTTP, real floor
subprocess), run in-process through bench.run's functions. Asserts structure and correctness only: no timing
thresholds, the machine is shared.

One class per section, each running only its own section (a class fixture), so xdist (``--dist loadscope``)
spreads the sections over the workers. The ``service`` section is run and asserted by
tests/bench/test_service_load_smoke.py, not twice. The tfmot comparison, the fine-tuning throughput, the
search, the datasets, the calibration (plus ~3 min for its three stand-in models on a cold cache) and the
structure (about 160 s) sections are marked ``slow``: ``make test-slow`` and
``make bench-smoke`` run them, ``make test`` keeps the sections whose code paths nothing else covers (the
API-vs-floor timing, quality, exports, compaction). The opt-in ``datasets_memory`` section has a smoke variant
of a few MB (two TensorFlow subprocesses), so it is smoked here too; ``bigmodel`` has none small enough."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from bench import results as bench_results
from bench import run as bench_run
from tests.support.model_cache import CACHE_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


def _positive_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


# Every section in the smoke run but `service` (asserted by its own test module), and the opt-in sections whose
# smoke variant is small enough for a test.
SMOKED = [name for name in bench_results.SECTIONS if name != "service"] + ["datasets_memory"]


@pytest.fixture(scope="class")
def smoke(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{section: result}`` for the class's ``section`` alone, and its part of a smoke RESULTS file."""
    name: str = request.cls.section
    root = tmp_path_factory.mktemp(f"bench-{name}")
    # models the sections (and the tests) share: the one model cache, else one per xdist worker
    cache = Path(os.environ.get(CACHE_ENV) or tmp_path_factory.getbasetemp() / "bench-cache")
    results = bench_run.run_sections(only=name, smoke=True, cache_dir=cache, work_dir=root / "work")
    report = bench_results.write_results(results, smoke=True, path=root / "RESULTS.md").read_text()
    assert report.startswith("<!-- bench:header -->\n# Secateurs benchmarks (SMOKE")
    assert "TensorFlow" in report and "CPUs" in report
    assert f"<!-- bench:{name} -->\n## {bench_results.ALL_SECTIONS[name]}" in report
    assert f"<!-- /bench:{name} -->" in report
    return results


def test_every_section_but_service_is_smoked_here() -> None:
    tested = {cls.section for cls in (globals()[n] for n in globals() if n.startswith("TestSmoke"))}
    assert tested == set(SMOKED)


class TestSmokeResnet:
    section = "resnet"

    def test_resnet_smoke_compares_api_and_floor(self, smoke: dict[str, Any]) -> None:
        result = smoke["resnet"]
        assert result["smoke"] is True and len(result["repeats"]) == 1
        for key in ("api_total_s", "floor_wall_s", "floor_in_process_s", "ratio_wall", "ratio_in_process"):
            mean, std = result["summary"][key]
            assert _positive_finite(mean), key
            assert math.isfinite(std) and std >= 0, key
        rep = result["repeats"][0]
        assert rep["order"] == ["floor", "api"]
        for side in ("api", "floor"):
            check = rep["verify"][side]
            assert check["ok"] and check["signatures_match"], check
            assert check["sparsity"] == pytest.approx(0.8, abs=0.01)
            assert check["prunable_variables"] > 0
        api = rep["api"]
        # the segments tile the API's total on one clock, and the job's stages are all there
        assert sum(api["segments_s"].values()) == pytest.approx(api["total_s"], abs=1e-6)
        assert all(math.isfinite(v) and v >= -0.01 for v in api["segments_s"].values()), api["segments_s"]
        assert set(api["job_timings_s"]) >= {"load", "baseline", "prune", "evaluate", "save", "total"}
        assert api["metrics_sparsity"] == pytest.approx(0.8, abs=0.01)
        assert api["artifact_bytes"] > 0
        floor = rep["floor"]
        assert set(floor["phases_s"]) == {"import", "load", "prune", "save", "zip"}
        assert floor["pruned_variables"] == rep["verify"]["floor"]["prunable_variables"]
        assert "| API total" in result["markdown"]


class TestSmokeDigits:
    section = "digits"

    def test_digits_smoke_reports_accuracies(self, smoke: dict[str, Any]) -> None:
        result = smoke["digits"]
        base = result["baseline"]
        assert 0.0 <= base["accuracy_api"] <= 1.0 and 0.0 <= base["accuracy_local"] <= 1.0
        assert base["accuracy_api"] == pytest.approx(base["accuracy_local"], abs=1.5 / base["n_test"])
        assert base["consistent_across_jobs"]
        assert len(result["cells"]) == 1
        for cell in result["cells"]:
            assert cell["verified"]
            assert 0.0 <= cell["accuracy"] <= 1.0
            # the metrics JSON describes the artifact actually shipped (one flipped sample allowed)
            assert cell["accuracy"] == pytest.approx(cell["local_accuracy"], abs=1.5 / base["n_test"])
            assert cell["sparsity_measured"] == pytest.approx(cell["sparsity"], abs=0.01)
        (row,) = result["summary"]
        assert row["n"] == 1 and 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0


@pytest.mark.slow
class TestSmokeTfmot:
    section = "tfmot"

    def test_tfmot_smoke_compares_from_identical_weights(self, smoke: dict[str, Any]) -> None:
        result = smoke["tfmot"]
        base = result["baseline"]
        # One set of weights on both sides: tf_keras, its Keras 3 twin and the service score the same.
        assert base["accuracy_tf_keras"] == base["accuracy_keras3"]
        assert base["accuracy_service"] == pytest.approx(base["accuracy_keras3"], abs=1.5 / base["n_test"])
        (row,) = result["rows"]
        for side in ("tfmot", "ours", "ours_layer", "ours_layer_f10", "ours_lamp"):
            assert 0.0 < row[side]["mean"] <= 1.0 and row[side]["std"] == 0.0
        assert _positive_finite(row["ours"]["ratio"])
        assert row["ours"]["ratio"] == pytest.approx(row["ours"]["mean"] / row["tfmot"]["mean"])
        (theirs,) = result["tfmot"]["cells"]
        assert theirs["sparsity_measured"] == pytest.approx(0.8, abs=0.01)
        assert all(s == pytest.approx(0.8, abs=0.01) for s in theirs["kernel_sparsity"].values())
        # tfmot got our default schedule's end step and update frequency.
        from bench.tfmot_quality import schedule_of

        ours_schedule = schedule_of(theirs["epochs"], base["n_train"])
        assert (theirs["end_step"], theirs["frequency"]) == (
            ours_schedule["end_step"],
            ours_schedule["frequency"],
        )
        runs = result["ours"]["runs"]
        assert {r["variant"] for r in runs} == {"ours", "ours_layer", "ours_layer_f10", "ours_lamp"}
        for run in runs:
            assert run["verified"]
            assert run["accuracy"] == pytest.approx(run["local_accuracy"], abs=1.5 / base["n_test"])
            assert run["sparsity_measured"] == pytest.approx(0.8, abs=0.01)
        assert runs[0]["spec"]["fine_tune"]["distill"] == {"alpha": 0.5, "temperature": 2.0}
        dense, pruned = result["sizes"]
        assert dense["ours_ratio"] == 1.0 and 0.0 < pruned["ours_ratio"] < 1.0
        assert 0.0 < pruned["tfmot_h5_ratio"] < 1.0 and 0.0 < pruned["tfmot_saved_model_ratio"] < 1.0
        assert result["goals"]["zip_ratio_80"] == pruned["ours_ratio"] and result["goals"]["drop_points"] is None
        assert Path(result["plot"]).read_bytes().startswith(b"\x89PNG")
        assert "| 80% | 1 |" in result["markdown"]


@pytest.mark.slow
class TestSmokeThroughput:
    section = "throughput"

    def test_throughput_smoke_measures_every_variant(self, smoke: dict[str, Any]) -> None:
        rows = {r["variant"]: r for r in smoke["throughput"]["rows"]}
        assert set(rows) == {"keras.fit", "ours", "ours + masks", "ours + masks + distill"}
        assert rows["keras.fit"]["ratio_to_keras_fit"] == 1.0
        for row in rows.values():
            assert _positive_finite(row["samples_per_s_median"]) and _positive_finite(row["ratio_to_keras_fit"])


class TestSmokeExports:
    section = "exports"

    def test_exports_smoke_reports_every_file_beside_the_saved_models(self, smoke: dict[str, Any]) -> None:
        result = smoke["exports"]
        assert set(result["runs"]) == {"unstructured", "channels"}
        for run in result["runs"].values():
            rows = {row["model"].split()[-1]: row for row in run["rows"]}
            assert set(rows) == {"SavedModel", "tflite_float32", "tflite_int8"}  # dense and pruned share a suffix
            dense = run["rows"][0]
            assert dense["model"] == "dense SavedModel" and dense["zip_ratio"] == 1.0
            for row in run["rows"][1:]:
                assert "error" not in row, row
                assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["zip_ratio"] < 1.0
            int8 = rows["tflite_int8"]
            assert int8["local_accuracy"] == int8["accuracy"]  # the downloaded file scores what the job said
            assert int8["zip"] < rows["tflite_float32"]["zip"]
        assert result["runs"]["channels"]["compact"] is True
        assert result["runs"]["channels"]["params_total"] < result["runs"]["channels"]["params_dense"]
        assert set(result["goal"]) == {"zip_ratio", "accuracy_drop", "met"}
        assert "| dense SavedModel |" in result["markdown"]


class TestSmokeCompaction:
    section = "compaction"

    def test_compaction_smoke_compacts_and_compares_side_by_side(self, smoke: dict[str, Any]) -> None:
        result = smoke["compaction"]
        assert result["smoke"] is True and result["speed"]
        for cell in result["speed"]:
            assert cell["compact"] is True, cell["notes"]
            assert cell["params"][1] < cell["params"][0] and cell["groups_pruned"] >= 1
            # the equivalence check ran (a compacted model compared with the masked one on real inputs)
            assert cell["max_abs_diff"], cell
            assert all(diff <= 1e-4 for diff in cell["max_abs_diff"].values())
        for cell in result["digits"]:
            channel, unstructured = cell["channel"], cell["unstructured"]
            assert channel["compact"] is True and channel["params"]["total"] < cell["baseline_params"]["total"]
            assert 0.0 <= channel["accuracy"] <= 1.0 and 0.0 <= unstructured["accuracy"] <= 1.0
            # the unstructured run is matched to the channel run's nonzero count (within rounding of the target)
            assert abs(unstructured["nonzero_prunable"] - channel["nonzero_prunable"]) <= 0.02 * channel[
                "nonzero_prunable"
            ] + 2
        assert set(result["goal"]) >= {"wanted", "speedup", "met"}


@pytest.mark.slow
class TestSmokeSearch:
    section = "search"

    def test_search_smoke_compares_a_search_per_drop_with_the_grid(self, smoke: dict[str, Any]) -> None:
        result = smoke["search"]
        assert [p["target"] for p in result["grid"]] == [0.5, 0.8]
        assert all(0.0 <= p["accuracy"] <= 1.0 and _positive_finite(p["wall_s"]) for p in result["grid"])
        assert set(result["searches"]) == {"0.005", "0.01"}
        for drop, search in result["searches"].items():
            if "chosen" in search:  # a search may fail honestly (no_sparsity_within_budget) on the tiny stand-in
                assert search["accuracy"] >= search["baseline"] - float(drop) - 1e-9
                assert search["trials"] >= 1 and _positive_finite(search["wall_s"])
        assert set(result["goal"]) == {"met", "by_drop"} and "grid best" in result["markdown"]


@pytest.mark.slow
class TestSmokeDatasets:
    section = "datasets"

    def test_datasets_smoke_measures_every_ratio_and_form(self, smoke: dict[str, Any]) -> None:
        result = smoke["datasets"]
        assert result["smoke"] is True
        speed = result["speed"]
        (row,) = speed["rounds"]
        assert set(row) == {"job", "keras", "s3", "job_pass"}
        assert _positive_finite(row["job_pass"]["predict_s"])  # the prediction pass alone, for context
        assert _positive_finite(row["job_pass"]["predict_cpu_s"]) and _positive_finite(row["keras"]["predict_cpu_s"])
        for side in ("job", "s3"):
            assert _positive_finite(row[side]["fine_tune_s"]) and _positive_finite(row[side]["evaluate_s"])
            assert 0.0 <= row[side]["accuracy"] <= 1.0
        # the same model and eval shards on every side: the baseline does not depend on where train came from
        assert row["job"]["baseline_accuracy"] == row["s3"]["baseline_accuracy"]
        assert speed["train_shards"] > 1  # several shards: the interleave and the S3 fetches are exercised
        for value in (*speed["samples_per_s"].values(), *speed["ratios"].values()):
            assert _positive_finite(value)
        assert set(result["goals"]) == {"fine_tune", "evaluate", "s3_vs_local", "forms"}
        forms = result["forms"]
        assert set(forms["runs"]) == {"npz", "tfrecord", "image_folder"}
        assert forms["baselines_identical"]  # the same pixels in every form
        for form, run in forms["runs"].items():
            assert run["streamed"] is (form != "npz")
            assert 0.0 <= run["accuracy"] <= 1.0
            assert run["sparsity"] == pytest.approx(0.9, abs=0.01)
        assert "| (b) fine-tuning" in result["markdown"] and "| image_folder |" in result["markdown"]


@pytest.mark.slow
class TestSmokeStructure:
    """About three minutes: a ViT trained for one epoch, three encoders and three budget jobs, ONNX files."""

    section = "structure"

    def test_structure_smoke_produces_every_row(self, smoke: dict[str, Any]) -> None:
        from bench.structure import GOALS

        result = smoke["structure"]
        parts, goals = result["parts"], result["goals"]
        assert set(parts) == {"vit", "bert", "encoder", "lstm", "resnet_macs", "vit_macs", "resnet_latency"}
        assert set(goals) == {
            "a_vit_speedup",
            "a_vit_accuracy",
            "b_bert_equal",
            "b_bert_speedup",
            "b_encoder_equal",
            "b_encoder_speedup",
            "c_lstm_speedup",
            "d_resnet_macs",
            "d_vit_macs",
            "d_resnet_latency",
            "e_resnet_macs_onnx",
            "e_vit_macs_onnx",
        }
        # what the installed analysis does: heads and MLP widths of Keras MultiHeadAttention blocks compacted
        for key in ("vit", "encoder", "resnet_macs", "vit_macs"):
            part = parts[key]
            assert "error" not in part, part.get("error")
            assert part["structure"]["compact"], part["structure"]
            assert _positive_finite(part["latency"]["speedup"]), key
        for key in ("vit", "encoder", "vit_macs"):
            kinds = parts[key]["structure"]["kinds"]
            assert kinds["heads"]["pruned"] >= 1 and kinds["mlp"]["pruned"] >= 1, kinds
        assert 0.0 <= parts["vit"]["accuracy"][1] <= 1.0 and math.isfinite(parts["vit"]["drop_points"])
        assert parts["encoder"]["structure"]["max_abs_diff"] <= GOALS["bert_diff"]
        for key in ("resnet_macs", "vit_macs"):
            budget = parts[key]["budget"]
            assert budget["unit"] == "macs" and budget["asked"] == 0.5
            assert abs(goals[f"d_{key}"]["value"]) <= GOALS["macs_tolerance"], budget
            p50 = parts[key]["latency"]["p50_ms"]
            assert {"dense", "compact", "dense_onnx", "compact_onnx"} <= set(p50)
            assert all(_positive_finite(v) for v in p50.values()), p50
            assert goals[f"e_{key}_onnx"]["value"] == pytest.approx(p50["dense_onnx"] / p50["compact_onnx"])
        # a part the analysis cannot do is reported with its reason, never a number
        for key in ("bert", "lstm", "resnet_latency"):
            part = parts[key]
            if "error" in part:
                assert part["error"]
            elif not part["structure"]["compact"]:
                assert "latency" not in part and part["structure"]["reasons"]
            else:
                assert _positive_finite(part["latency"]["speedup"])
        for goal in goals.values():
            assert goal["met"] is None or isinstance(goal["met"], bool)
            assert goal["value"] is None or math.isfinite(goal["value"])
        for label in ("(a) ViT", "(b) KerasHub BERT", "(c) LSTM", "(d) ResNet-50", "(d) ViT", "(e) ViT"):
            assert f"| {label}" in result["markdown"], label


@pytest.mark.slow
class TestSmokeDatasetsMemory:
    section = "datasets_memory"

    def test_datasets_memory_smoke_runs_both_sizes_in_subprocesses(self, smoke: dict[str, Any]) -> None:
        result = smoke["datasets_memory"]
        small, large = result["sets"]["small"], result["sets"]["large"]
        assert large["bytes"] > 2 * small["bytes"] and large["records"] > 2 * small["records"]
        for one in (small, large):
            assert one["child"]["peak_rss_kib"] > 50_000  # a TensorFlow process
            assert one["child"]["timings_s"]["fine_tune"] > 0
        full = large["child"]["full_pass"]
        assert full["records"] == large["records"] and _positive_finite(full["records_per_s"])
        assert "full_pass" not in small["child"]
        assert result["goal"]["ratio"] == pytest.approx(
            large["child"]["peak_rss_kib"] / small["child"]["peak_rss_kib"]
        )
        assert "Peak RSS large / small" in result["markdown"]


@pytest.mark.slow
class TestSmokeCalibration:
    section = "calibration"

    def test_calibration_smoke_measures_every_row_it_can(self, smoke: dict[str, Any]) -> None:
        from app.schemas.spec import PruneSpec
        from app.schemas.vocabulary import CRITERIA

        result = smoke["calibration"]
        assert result["smoke"] is True

        def runs(row: dict[str, Any], criterion: str | None, field: str | None = None) -> bool:
            """A row is skipped only when this build lacks what it asks for; a skipped row says why."""
            available = (criterion is None or criterion in CRITERIA) and (
                field is None or field in PruneSpec.model_fields
            )
            assert ("skipped" not in row) is available, row
            if not available:
                assert row["skipped"], row
            return available

        lm = result["lm"]
        assert 1.0 < lm["dense_perplexity"] < 128.0  # learned something: below a uniform guess over 128 codes
        assert set(lm["rows"]) == {
            f"{c}@{g}" for c in ("magnitude", "wanda", "sparsegpt") for g in ("unstructured", "2:4")
        }
        for granularity in ("unstructured", "2:4"):
            magnitude = lm["rows"][f"magnitude@{granularity}"]
            assert runs(magnitude, "magnitude")
            assert magnitude["sparsity"] == pytest.approx(0.5, abs=0.01)
            assert magnitude["increase"] == pytest.approx(magnitude["perplexity"] - lm["dense_perplexity"])
            assert magnitude["increase"] > 0  # half the kernels gone: the stand-in LM does get worse
            for criterion in ("wanda", "sparsegpt"):
                row = lm["rows"][f"{criterion}@{granularity}"]
                if runs(row, criterion):
                    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
                    assert math.isfinite(row["ratio"])
                    assert row["ratio"] == pytest.approx(row["increase"] / magnitude["increase"])

        def accuracy_rows(rows: dict[str, Any], expected: dict[str, tuple[str | None, str | None]]) -> None:
            assert set(rows) == set(expected)
            for key, (criterion, field) in expected.items():
                row = rows[key]
                if runs(row, criterion, field):
                    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["baseline_accuracy"] <= 1.0
                    assert row["drop_points"] == pytest.approx(
                        100 * (row["baseline_accuracy"] - row["accuracy"])
                    )
                    assert _positive_finite(row["wall_s"])

        cnn = result["cnn"]["rows"]
        accuracy_rows(
            cnn,
            {
                "magnitude@2:4": ("magnitude", None),
                "wanda@2:4": ("wanda", None),
                "sparsegpt@2:4": ("sparsegpt", None),
                "fast@95%": ("magnitude", None),
                "wanda+fast@95%": ("wanda", None),
                "sparsegpt+fast@95%": ("sparsegpt", None),
                "sparsegpt+lamp_allocation@95%": ("sparsegpt", None),
            },
        )
        assert cnn["fast@95%"]["sparsity"] == pytest.approx(0.95, abs=0.01)
        assert cnn["fast@95%"]["spec"]["normalization"] == "lamp"  # the preset as a user gets it
        allocated = cnn["sparsegpt+lamp_allocation@95%"]
        if "skipped" not in allocated:  # pruned to the per-layer sparsities fast's global ranking chose
            assert allocated["sparsity"] == pytest.approx(0.95, abs=0.01)
            fast = cnn["fast@95%"]["layer_sparsity"]
            assert fast and allocated["layer_sparsity"] == pytest.approx(fast, abs=0.01)
        repair = result["repair"]
        accuracy_rows(
            repair["one_shot"],
            {"channel30": (None, None), "channel30+reconstruct": (None, "reconstruct")},
        )
        accuracy_rows(
            repair["fine_tuned"],
            {
                "recommended": (None, None),
                "recommended+one_shot": (None, None),
                "recommended+one_shot+reconstruct": (None, "reconstruct"),
            },
        )
        assert repair["fine_tuned"]["recommended"]["spec"]["fine_tune"]["epochs"] == 3
        cost = result["cost"]["rows"]
        assert set(cost) == {"magnitude", "sparsegpt"}
        for criterion, row in cost.items():
            if runs(row, criterion):
                assert (
                    _positive_finite(row["wall_s"]) and row["peak_rss_kib"] > 50_000
                )  # a TensorFlow process
                assert row["sparsity"] == pytest.approx(0.5, abs=0.01)
        if "ratio" in cost["sparsegpt"]:
            assert cost["sparsegpt"]["ratio"] == pytest.approx(
                cost["sparsegpt"]["wall_s"] / cost["magnitude"]["wall_s"]
            )
        goals = result["goals"]
        assert set(goals) == {
            "lm_unstructured",
            "lm_nm",
            "lm_wanda_unstructured",
            "lm_wanda_nm",
            "cnn_nm",
            "cnn_95",
            "channel_repair",
            "repair_fine_tune_points",
            "resnet_time",
        }
        for goal in goals.values():
            measured = goal.get("ratio", goal.get("points"))
            assert (goal["met"] is None) is (measured is None), goal
            if measured is not None:
                assert math.isfinite(measured)
        for heading in ("(a) Language model", "(b) Fashion-MNIST CNN", "(c) 30% of channels", "(e) Cost"):
            assert heading in result["markdown"]
