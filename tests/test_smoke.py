from viewmw import Store, ViewTracker


async def test_pg_and_redis_count_a_view(real_redis, pg_store: Store, settings, clock) -> None:
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    result = await tracker.track_view("story", 7, "user:1")
    assert result.counted and result.count is not None and result.count.total == 1
    assert await tracker.get_view_counts("story", [7]) == {"7": 1}
