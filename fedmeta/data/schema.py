"""The schema model of a node's CSV file (``schema.toml``), validated with pydantic.

The file format is described in :mod:`fedmeta.data.csv_loader`; this module
holds only the models. Parse a schema file with
:func:`fedmeta.data.csv_loader.load_schema`, which turns every problem into a
one-line :class:`~fedmeta.data.csv_loader.DataError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
    model_validator,
)

_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _column_name(name: str) -> str:
    if not name:
        raise ValueError("column name is empty")
    if name != name.strip():
        raise ValueError(f"column name {name!r} has leading or trailing whitespace")
    if any(c in _LINE_BREAKS for c in name):
        raise ValueError(f"column name {name!r} contains a line break")
    return name


ColumnName = Annotated[str, AfterValidator(_column_name)]
"""A CSV header name: non-empty, no surrounding whitespace, no line breaks."""


def _class_name(name: str) -> str:
    if not name.strip():
        raise ValueError("class name is empty")
    if name != name.strip():
        raise ValueError(f"class name {name!r} has leading or trailing whitespace")
    return name


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def _duplicates(names: list[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    return dups


class DatasetSpec(BaseModel):
    """The ``[dataset]`` table: what the trainer reads and how to read it."""

    model_config = _STRICT

    name: Annotated[str, AfterValidator(_class_name)]
    task: Literal["classification", "regression"]
    label: ColumnName
    features: list[ColumnName]
    classes: list[Annotated[str, AfterValidator(_class_name)]] | None = None
    group: ColumnName | None = None
    unit_column: ColumnName | None = None
    """The privacy unit of each row (e.g. a pseudonymous ``patient_id``): DP protects all
    of a unit's rows together; without it each row is its own unit."""
    delimiter: str = ","
    missing: Literal["error", "drop-row"] = "error"
    standardise: bool = False
    """Scale each feature to mean 0, std 1 with statistics fitted on this site's own rows
    (``fedmeta.data.loaders.tabular``; kept with an adapted model for predictions)."""

    @field_validator("features")
    @classmethod
    def _check_features(cls, features: list[str], info: ValidationInfo) -> list[str]:
        if not features:
            raise ValueError("list is empty: name at least one feature column")
        dups = _duplicates(features)
        if dups:
            raise ValueError(f"lists {', '.join(map(repr, dups))} more than once")
        label = info.data.get("label")
        if label is not None and label in features:
            raise ValueError(f"label {label!r} is also listed here: a label must not be a feature")
        return features

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, classes: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if classes is None:
            return None
        if info.data.get("task", "classification") != "classification":
            raise ValueError('only allowed when task = "classification"')
        if not classes:
            raise ValueError("list is empty: list the label values or remove the key")
        dups = _duplicates(classes)
        if dups:
            raise ValueError(f"lists {', '.join(map(repr, dups))} more than once")
        return classes

    @field_validator("group")
    @classmethod
    def _check_group(cls, group: str | None, info: ValidationInfo) -> str | None:
        if group is not None and group == info.data.get("label"):
            raise ValueError(f"{group!r} is the label column")
        return group

    @field_validator("unit_column")
    @classmethod
    def _check_unit_column(cls, unit: str | None, info: ValidationInfo) -> str | None:
        if unit is None:
            return None
        if unit == info.data.get("label"):
            raise ValueError(f"{unit!r} is the label column")
        if unit in (info.data.get("features") or []):
            raise ValueError(
                f"{unit!r} is also a feature: an identifier must never reach the trainer"
            )
        return unit

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, d: str) -> str:
        if len(d) != 1 or d in _LINE_BREAKS or d in "\"' " or d.isalnum():
            raise ValueError(
                f'{d!r} is not usable: give one character such as ",", ";" or "\\t" '
                "(not a quote, space, letter or digit)"
            )
        return d


class ColumnsSpec(BaseModel):
    """The optional ``[columns]`` table: per-record metadata for the policy engine."""

    model_config = _STRICT

    record_id: ColumnName | None = None
    consent_purposes: ColumnName | None = None
    consent_withdrawn_at: ColumnName | None = None
    age: ColumnName | None = None
    minor: ColumnName | None = None
    guardian_consent: ColumnName | None = None
    collected_at: ColumnName | None = None
    erasure_requested: ColumnName | None = None
    objected_at: ColumnName | None = None
    restricted_at: ColumnName | None = None
    opted_out_at: ColumnName | None = None

    def declared(self) -> dict[str, str]:
        """Metadata role -> column name, for the roles that name a column."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @model_validator(mode="after")
    def _check(self) -> ColumnsSpec:
        declared = self.declared()
        dups = _duplicates(list(declared.values()))
        if dups:
            roles = [k for k, v in declared.items() if v in dups]
            raise ValueError(
                f"column {dups[0]!r} is given for more than one role ({', '.join(roles)})"
            )
        return self


class CsvSchema(BaseModel):
    """A whole ``schema.toml``: ``[dataset]`` and optional ``[columns]``."""

    model_config = _STRICT

    dataset: DatasetSpec
    columns: ColumnsSpec = ColumnsSpec()

    @model_validator(mode="after")
    def _check(self) -> CsvSchema:
        ds, declared = self.dataset, self.columns.declared()
        for role, col in declared.items():
            if col == ds.label:
                raise ValueError(f"[columns].{role} {col!r} is the label column")
        rid = self.columns.record_id
        if rid is not None and (rid in ds.features or rid == ds.group):
            raise ValueError(
                f"[columns].record_id {rid!r} is also a feature or the group column: "
                "an identifier must never reach the trainer"
            )
        return self

    @property
    def columns_read(self) -> tuple[str, ...]:
        """Every column the loader reads: features, label, group, metadata (no repeats)."""
        ds = self.dataset
        names = [*ds.features, ds.label]
        if ds.group is not None:
            names.append(ds.group)
        if ds.unit_column is not None:
            names.append(ds.unit_column)
        names.extend(self.columns.declared().values())
        return tuple(dict.fromkeys(names))
