"""Helpers for the metrics tests: scrape an endpoint, parse it, compare two scrapes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> dict[Sample, float]:
    """Every sample of an exposition text, keyed by its name and labels."""
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} exported twice"
            samples[key] = sample.value
    return samples


def key(name: str, **labels: str) -> Sample:
    return (name, frozenset(labels.items()))


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> dict[Sample, float]:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def increase(before: Mapping[Sample, float], after: Mapping[Sample, float]) -> Counter[Sample]:
    """How much each viewmw counter (``_total``) and histogram count grew between two scrapes."""
    grown: Counter[Sample] = Counter()
    for sample, value in after.items():
        if sample[0].startswith("viewmw_") and sample[0].endswith(("_total", "_count")):
            delta = value - before.get(sample, 0.0)
            if delta:
                grown[sample] = int(delta)
    return grown
