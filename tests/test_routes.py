"""Route patterns: Starlette syntax, start-up validation, root_path, first match wins."""

from __future__ import annotations

import pytest

from viewmw.errors import ConfigurationError
from viewmw.routes import RouteMatch, RouteTable, route_path

TABLE = RouteTable(
    {
        "/stories/{id:int}": "story",
        "/fantasies/{id}": "fantasy",
        "/tasks/{slug}": ("task", "slug"),
        "/users/{user}/outcomes/{id:int}": "outcome",
        "/files/{id:path}": "file",
    }
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/stories/7", ("story", "7")),
        ("/stories/007", ("story", "7")),  # int converter: one content, however it is written
        ("/fantasies/the-glass-dragon", ("fantasy", "the-glass-dragon")),
        ("/tasks/write-docs", ("task", "write-docs")),
        ("/users/alice/outcomes/3", ("outcome", "3")),
        ("/files/a/b", ("file", "a/b")),  # matched; the key check refuses it later
    ],
)
def test_matches_like_starlette(path: str, expected: tuple[str, str]) -> None:
    found = TABLE.match_path(path)
    assert found is not None
    assert (found.content_type, found.content_id) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/stories/abc",
        "/stories/7/",
        "/stories/",
        "/stories",
        "/static/app.css",
        "",
        "/users/alice/outcomes/x",
        "/stories/" + "9" * 5000,  # int() refuses it; no match rather than an error
    ],
)
def test_does_not_match(path: str) -> None:
    assert TABLE.match_path(path) is None


def test_first_pattern_wins() -> None:
    table = RouteTable({"/s/{id:int}": "story", "/s/{id}": "fantasy"})
    assert table.match_path("/s/1") == RouteMatch("story", "1", "/s/{id:int}")
    assert table.match_path("/s/x") == RouteMatch("fantasy", "x", "/s/{id}")
    assert [p for p, _, _ in table.patterns] == ["/s/{id:int}", "/s/{id}"]


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/blog/stories/1", "/blog", "/stories/1"),
        ("/blog", "/blog", ""),
        ("/blogroll/stories/1", "/blog", "/blogroll/stories/1"),  # not at a segment boundary
        ("/stories/1", "/blog", "/stories/1"),  # server already removed the prefix
        ("/stories/1", "", "/stories/1"),
    ],
)
def test_route_path_strips_root_path(path: str, root_path: str, expected: str) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root_path}) == expected


def test_match_uses_route_path() -> None:
    scope = {"type": "http", "path": "/blog/stories/5", "root_path": "/blog"}
    assert TABLE.match(scope) == RouteMatch("story", "5", "/stories/{id:int}")


def test_coerce_keeps_a_table() -> None:
    assert RouteTable.coerce(TABLE) is TABLE
    assert len(RouteTable.coerce({"/a/{id}": "story"})) == 1
    assert "story" in repr(RouteTable.coerce({"/a/{id}": "story"}))


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"/stories/{id:integer}": "story"}, "unknown path converter 'integer'"),
        ({"/stories/{slug}": "story"}, "no path parameter 'id'"),
        ({"/stories/{id}": ("story", "key")}, "no path parameter 'key'"),
        ({"/stories": "story"}, "no path parameter 'id'"),
        ({"stories/{id}": "story"}, "must be a path starting with '/'"),
        ({"/stories/{id}": "Story!"}, "content type must be"),
        ({"/stories/{id}": "viewed"}, "content type must be"),
        ({"/stories/{id}": ("story",)}, "expected a content type or (content type, id parameter)"),
        ({"/stories/{id}": 3}, "expected a content type"),
        ({"/a/{id}/b/{id}": "story"}, "Duplicated param name id"),
    ],
)
def test_invalid_routes_fail_at_start_up(routes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RouteTable(routes)  # type: ignore[arg-type]
    assert raised.value.setting == "routes"
    assert message in str(raised.value)


def test_empty_table_matches_nothing() -> None:
    assert RouteTable({}).match_path("/stories/1") is None
