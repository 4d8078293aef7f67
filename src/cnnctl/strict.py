"""The base of every spec model and the field types they share (no cnnctl imports: nn/ and config use it)."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import Strict as NoCoercion
from pydantic_core import PydanticCustomError

# counts are integers as written (`epochs: true` or `filters: 3.5` are errors, not 1 and 3), and fit in int32
# (10^30 filters is a clear error, not an overflow deep in NumPy)
INT_MAX = 2**31 - 1
PosInt = Annotated[int, NoCoercion(), Field(gt=0, le=INT_MAX)]
NonNegInt = Annotated[int, NoCoercion(), Field(ge=0, le=INT_MAX)]
PosPair = PosInt | tuple[PosInt, PosInt]
Monitor = Literal["val_loss", "val_acc", "train_loss", "train_acc"]
Mode = Literal["auto", "min", "max"]
# the magnitudes a nonzero float32 holds at full precision (numpy.finfo(numpy.float32).tiny and .max): every number
# of a config ends up in float32 arithmetic, where 1e39 is infinite and 1e-300 is zero
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _floats(v: Any):
    if isinstance(v, float):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _floats(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)


class Strict(BaseModel):
    """Base for every spec model: unknown keys are errors that suggest the closest known key; numbers must be
    finite (`lr: .inf`, `1e400` and NaN are refused)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _float32(cls, v: Any) -> Any:
        """Every float (in lists and mappings too) is 0 or of a magnitude float32 holds."""
        for x in _floats(v):
            if x != 0 and x == x and not FLOAT32_TINY <= abs(x) <= FLOAT32_MAX:  # NaN: refused as not finite
                raise PydanticCustomError(
                    "float32", "{value} is not representable in float32, the precision cnnctl computes in: a nonzero "
                    "number must lie between 1.2e-38 and 3.4e38 in magnitude", {"value": repr(x)})
        return v

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key '{key}'; {hint}known keys: {known}",
                        {"key": str(key), "hint": hint, "known": ", ".join(known)},
                    )
        return data
