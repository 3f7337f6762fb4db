"""Generation settings: one dataclass for the UI, the record stored with each answer, the CLI and the API.

A GenerationSettings is checked when it is made, whichever way (the constructor, ``from_dict``, ``from_ui``),
so code holding one never checks again. The defaults are the engine's (``SamplingParams``); the facts a UI
needs to show each setting (label, range, step, help text, element id) sit next to the field, and ``FIELDS``
hands them out in display order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine.generation import SamplingParams

_ENGINE = SamplingParams()
RANDOM_SEED = -1  # the seed the UI shows for "a fresh random seed for every answer"


class SettingsError(ValueError):
    """A bad setting; the message names it and is worded to be shown as is."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):  # bool is an int subclass: True would pass as 1.0
        raise SettingsError(f"Setting {name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"Setting {name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise SettingsError(f"Setting {name} must be a finite number, got {value!r}.")
    return number


def _whole(name: str, value: Any) -> int:
    number = _number(name, value)
    if number != int(number):  # UI number fields often hand over 512.0
        raise SettingsError(f"Setting {name} must be a whole number, got {value!r}.")
    return int(number)


@dataclass(frozen=True)
class SettingField:
    """What a UI needs to show one setting. Values are as the UI shows them (see GenerationSettings.to_ui):
    the seed box holds RANDOM_SEED for random, the system prompt box "" for the model's default."""

    name: str
    label: str
    elem_id: str
    control: str  # "slider", "number" or "textbox"
    default: Any
    minimum: float | None = None  # the UI's range; the hard limits are SamplingParams' checks
    maximum: float | None = None
    step: float | None = None
    info: str | None = None
    placeholder: str | None = None
    lines: int | None = None


def _ui(label: str, elem_id: str, control: str, **facts: Any) -> dict:
    return {"ui": {"label": label, "elem_id": elem_id, "control": control, **facts}}


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = field(default=_ENGINE.temperature, metadata=_ui(
        "Temperature", "temperature", "slider", minimum=0.0, maximum=2.0, step=0.05,
        info="0 = greedy (deterministic)"))
    top_p: float = field(default=_ENGINE.top_p, metadata=_ui(
        "Top-p", "top-p", "slider", minimum=0.05, maximum=1.0, step=0.01))
    top_k: int = field(default=_ENGINE.top_k, metadata=_ui(
        "Top-k", "top-k", "slider", minimum=0, maximum=200, step=1, info="0 = no limit"))
    max_new_tokens: int = field(default=_ENGINE.max_new_tokens, metadata=_ui(
        "Max new tokens", "max-new-tokens", "slider", minimum=1, maximum=4096, step=1))
    repetition_penalty: float = field(default=_ENGINE.repetition_penalty, metadata=_ui(
        "Repetition penalty", "repetition-penalty", "slider", minimum=0.8, maximum=2.0, step=0.01))
    seed: int | None = field(default=_ENGINE.seed, metadata=_ui(  # None: random
        "Seed", "seed", "number", minimum=RANDOM_SEED, step=1,
        info=f"{RANDOM_SEED} = random (only matters when temperature > 0)"))
    system_prompt: str | None = field(default=None, metadata=_ui(  # None: the model's (or conversation's) own
        "System prompt", "system-prompt", "textbox", lines=3,
        placeholder="Empty = the model's default system prompt (or the one this conversation was started with)"))

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            self._put(name, _number(name, getattr(self, name)))
        for name in ("top_k", "max_new_tokens"):
            self._put(name, _whole(name, getattr(self, name)))
        if self.seed in (None, ""):  # a UI text field hands over "" when emptied
            self._put("seed", None)
        elif (seed := _whole("seed", self.seed)) < 0:
            raise SettingsError("Setting seed must be a whole number ≥ 0 (or empty for a random seed).")
        else:
            self._put("seed", seed)
        prompt = self.system_prompt
        if prompt is not None and not isinstance(prompt, str):
            raise SettingsError("Setting system_prompt must be text.")
        self._put("system_prompt", prompt if prompt and prompt.strip() else None)
        try:
            self.sampling()  # the engine's own range checks
        except ValueError as e:
            raise SettingsError(f"Invalid setting: {e}.") from None

    def _put(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalises

    # ------------------------------------------------------------------ making one
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> GenerationSettings:
        """From a dict such as to_dict() gives or an API caller sends. Missing or None values take the
        defaults; unknown keys are refused (a typo would otherwise be silently ignored)."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise SettingsError(f"Settings must be a dict of setting names to values, got {type(values).__name__}.")
        unknown = sorted(set(values) - set(NAMES))
        if unknown:
            raise SettingsError(f"Unknown setting(s): {', '.join(unknown)}. Known settings: {', '.join(NAMES)}.")
        return cls(**{name: value for name, value in values.items() if value is not None})

    @classmethod
    def from_ui(cls, values: Mapping[str, Any]) -> GenerationSettings:
        """From the UI's widgets (names as in FIELDS): like from_dict, but the seed box's RANDOM_SEED (-1)
        means a random seed. Other negative seeds are still refused."""
        values = dict(values)
        if values.get("seed") == RANDOM_SEED:
            values["seed"] = None
        return cls.from_dict(values)

    @classmethod
    def coerce(cls, value: GenerationSettings | Mapping[str, Any] | None) -> GenerationSettings:
        """A GenerationSettings as is; a dict (or None for the defaults) through from_dict."""
        return value if isinstance(value, GenerationSettings) else cls.from_dict(value)

    @classmethod
    def from_sampling(cls, params: SamplingParams, system_prompt: str | None = None) -> GenerationSettings:
        return cls(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                   max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                   seed=params.seed, system_prompt=system_prompt)

    # ------------------------------------------------------------------ using one
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                              seed=self.seed)

    def to_dict(self) -> dict:
        """The record stored with each answer (and with a conversation), so it can be shown and reproduced;
        from_dict reads it back."""
        return asdict(self)

    def to_ui(self) -> dict:
        """Values for the UI's widgets, by field name: from_ui reads them back."""
        values = self.to_dict()
        values["seed"] = RANDOM_SEED if self.seed is None else self.seed
        values["system_prompt"] = self.system_prompt or ""
        return values


NAMES = tuple(f.name for f in fields(GenerationSettings))
_UI_DEFAULTS = GenerationSettings().to_ui()
FIELDS = tuple(SettingField(name=f.name, default=_UI_DEFAULTS[f.name], **f.metadata["ui"])
               for f in fields(GenerationSettings))

