"""What every family's config dataclass shares: plain-dict (JSON) round trip with unknown keys refused."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from scforge.errors import ConfigError

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for config dataclasses: ``to_dict`` / ``from_dict`` (unknown fields are a ConfigError)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {unknown}.")
        return cls(**data)
