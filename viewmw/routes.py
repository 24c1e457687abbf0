"""Which request paths show which content: Starlette path patterns mapped to a content type.

Patterns use Starlette's own syntax and compiler (``/stories/{id:int}``), so they read like the
app's routes and match exactly what Starlette would match. Everything is checked when the table is
built: a typo in a pattern stops the app at start-up, not at the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from re import Pattern
from typing import Any, NamedTuple

from starlette.convertors import CONVERTOR_TYPES, Convertor
from starlette.routing import PARAM_REGEX, compile_path
from starlette.types import Scope

from viewmw.errors import ConfigurationError, InvalidKeyError
from viewmw.keys import validate_content_type

DEFAULT_ID_PARAM = "id"

RouteSpec = str | tuple[str, str]
"""A content type, or ``(content type, name of the path parameter holding the id)``."""


class RouteMatch(NamedTuple):
    """A path that shows one content. ``content_id`` is the converted id as text, unvalidated."""

    content_type: str
    content_id: str
    pattern: str


@dataclass(frozen=True, slots=True)
class _Route:
    pattern: str
    content_type: str
    id_param: str
    regex: Pattern[str]
    convertor: Convertor[Any]
    prefix: str  # the literal text before the first parameter: a cheap first test


class RouteTable:
    """Patterns tried in the order given; the first that matches decides the content.

    Args:
        routes: pattern -> content type, or pattern -> ``(content type, id parameter)``, e.g.
            ``{"/stories/{id:int}": "story", "/tasks/{slug}": ("task", "slug")}``.

    Raises:
        ConfigurationError: for a pattern Starlette cannot compile, an unknown converter, a
            missing id parameter or an invalid content type.
    """

    __slots__ = ("_prefixes", "_routes")

    def __init__(self, routes: Mapping[str, RouteSpec]) -> None:
        self._routes = tuple(_compile(pattern, spec) for pattern, spec in routes.items())
        # str.startswith with a tuple rejects most paths (assets, APIs) in one C-level call.
        self._prefixes = tuple(route.prefix for route in self._routes)

    @classmethod
    def coerce(cls, routes: RouteTable | Mapping[str, RouteSpec]) -> RouteTable:
        """``routes`` itself if it is a table already, else a new table built from it."""
        return routes if isinstance(routes, RouteTable) else cls(routes)

    @property
    def patterns(self) -> tuple[tuple[str, str, str], ...]:
        """``(pattern, content type, id parameter)`` for every route, in matching order."""
        return tuple((r.pattern, r.content_type, r.id_param) for r in self._routes)

    def match(self, scope: Scope) -> RouteMatch | None:
        """Match the request's path inside the app (``root_path`` removed, as Starlette does)."""
        return self.match_path(route_path(scope))

    def match_path(self, path: str) -> RouteMatch | None:
        """The content shown at ``path``, or ``None``."""
        if not path.startswith(self._prefixes):
            return None
        for route in self._routes:
            if not path.startswith(route.prefix):
                continue
            found = route.regex.match(path)
            if found is None:
                continue
            try:
                content_id = str(route.convertor.convert(found[route.id_param]))
            except ValueError:  # e.g. int() refuses more than 4300 digits
                return None
            return RouteMatch(route.content_type, content_id, route.pattern)
        return None

    def __len__(self) -> int:
        return len(self._routes)

    def __repr__(self) -> str:
        return f"RouteTable({ {r.pattern: (r.content_type, r.id_param) for r in self._routes} })"


def route_path(scope: Scope) -> str:
    """The path inside the app: ``path`` without a leading ``root_path`` (mounts, proxies)."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    # Strip only at a segment boundary, so root "/blog" leaves "/blogroll" alone.
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest or rest[0] == "/":
            return rest
    return path


def _compile(pattern: object, spec: object) -> _Route:
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ConfigurationError("routes", f"pattern must be a path starting with '/': {pattern!r}")
    content_type, id_param = _split_spec(pattern, spec)
    try:
        validate_content_type(content_type)
    except InvalidKeyError as exc:
        raise ConfigurationError("routes", f"{pattern!r}: {exc}") from None
    # compile_path reports an unknown converter with a bare assert (gone under `python -O`).
    for found in PARAM_REGEX.finditer(pattern):
        converter = (found.group(2) or ":str")[1:]
        if converter not in CONVERTOR_TYPES:
            raise ConfigurationError(
                "routes",
                f"{pattern!r}: unknown path converter {converter!r} "
                f"(known: {', '.join(sorted(CONVERTOR_TYPES))})",
            )
    try:
        regex, _, convertors = compile_path(pattern)
    except (AssertionError, ValueError) as exc:
        raise ConfigurationError("routes", f"{pattern!r}: {exc}") from None
    if id_param not in convertors:
        names = ", ".join(sorted(convertors)) or "none"
        raise ConfigurationError(
            "routes",
            f"{pattern!r}: no path parameter {id_param!r} holds the content id "
            f"(parameters: {names}); write {{{id_param}}} in the pattern or name the parameter, "
            f'e.g. {{"{pattern}": ("{content_type}", "slug")}}',
        )
    prefix = pattern[: pattern.index("{")] if "{" in pattern else pattern
    return _Route(pattern, content_type, id_param, regex, convertors[id_param], prefix)


def _split_spec(pattern: str, spec: object) -> tuple[str, str]:
    if isinstance(spec, str):
        return spec, DEFAULT_ID_PARAM
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], str)
    ):
        return spec[0], spec[1]
    raise ConfigurationError(
        "routes",
        f"{pattern!r}: expected a content type or (content type, id parameter), got {spec!r:.80}",
    )
