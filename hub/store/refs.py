"""Adapter names, versions and refs (`NAME` or `NAME@VERSION`): the one place they are checked, parsed and spelled."""

from __future__ import annotations

import re
from typing import NamedTuple

from hub.errors import HubError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LEN = 64
SEPARATOR = "@"


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe single path component, else raise HubError."""
    if not isinstance(value, str) or not value:
        raise HubError(f"adapter {what} must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise HubError(f"adapter {what} {value!r} is longer than {MAX_NAME_LEN} characters")
    if not NAME_RE.fullmatch(value):
        raise HubError(
            f"invalid adapter {what} {value!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class Ref(NamedTuple):
    """An adapter name and a version (None: the newest usable one); `str()` spells it, `Ref.parse` reads it.

    A tuple, so ``name, version = Ref.parse(text)`` unpacks."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """``NAME`` or ``NAME@VERSION``, both parts validated (HubError otherwise)."""
        name, sep, version = text.partition(SEPARATOR)
        validate_name(name)
        return cls(name, validate_name(version, "version") if sep else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}{SEPARATOR}{self.version}"

    @property
    def slug(self) -> str:
        """The ref as one file-name part: ``NAME-VERSION`` (or ``NAME``)."""
        return str(self).replace(SEPARATOR, "-")


def parse_ref(text: str) -> Ref:
    """`Ref.parse`: split ``NAME`` or ``NAME@VERSION`` into (name, version or None), validating both."""
    return Ref.parse(text)


def format_ref(name: str, version: str | None) -> str:
    """``NAME@VERSION`` (``NAME`` when version is None)."""
    return str(Ref(name, version))


def version_key(version: str) -> tuple:
    """Integers numerically, then anything else by text: a stable tie-break for equal created_at."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
