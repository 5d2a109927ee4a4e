"""The spec's ``fine_tune.distill`` and the polynomial schedule's default ``frequency``: validated like every other
field (ranges, unknown keys refused), defaults as documented."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.schemas.spec import Distill, PruneSpec


def _spec(fine_tune: dict[str, Any], schedule: dict[str, Any] | None = None) -> PruneSpec:
    return PruneSpec.model_validate(
        {"target_sparsity": 0.8, "fine_tune": fine_tune, "schedule": schedule or {"kind": "polynomial"}}
    )


def test_distill_is_off_unless_asked_and_has_documented_defaults() -> None:
    assert _spec({"epochs": 3}).fine_tune.distill is None  # type: ignore[union-attr]
    distill = _spec({"epochs": 3, "distill": {}}).fine_tune.distill  # type: ignore[union-attr]
    assert distill == Distill(alpha=0.5, temperature=2.0)
    custom = _spec({"distill": {"alpha": 1, "temperature": 4}}).model_dump()["fine_tune"]["distill"]
    assert custom == {"alpha": 1.0, "temperature": 4.0}


@pytest.mark.parametrize(
    ("distill", "field"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": 1000}, "temperature"),
        ({"temprature": 2}, "temprature"),  # a typo is refused, not ignored
        ({"teacher": "other-model"}, "teacher"),
    ],
)
def test_distill_refuses_bad_values_and_unknown_keys(distill: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        _spec({"distill": distill})
    assert any(e["loc"][-1] == field for e in err.value.errors())


def test_polynomial_frequency_defaults_to_auto_and_stays_validated() -> None:
    spec = _spec({"epochs": 3})
    assert spec.schedule.frequency is None  # type: ignore[union-attr]
    assert spec.model_dump()["schedule"]["frequency"] is None
    assert _spec({}, {"kind": "polynomial", "frequency": 25}).schedule.frequency == 25  # type: ignore[union-attr]
    for bad in (0, -1, 100_001, 2.5):
        with pytest.raises(ValidationError, match="frequency"):
            _spec({}, {"kind": "polynomial", "frequency": bad})


def test_the_published_spec_schema_describes_distill() -> None:
    schema = PruneSpec.model_json_schema()
    distill = schema["$defs"]["Distill"]
    assert distill["additionalProperties"] is False
    assert set(distill["properties"]) == {"alpha", "temperature"}
    assert "distill" in schema["$defs"]["FineTune"]["properties"]
