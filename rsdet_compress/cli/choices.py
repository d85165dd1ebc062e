"""Registry names offered as CLI choices, each looked up only when argparse needs it.

Every lookup imports its registry inside the function: the registries pull in torch and
ultralytics, and ``rsdet-compress --help`` should answer in 0.2 s, not ~10 s.
"""
from __future__ import annotations


def detectors() -> list[str]:
    from rsdet_compress.detectors.registry import list_detectors
    return list_detectors()


def readers() -> list[str]:
    from rsdet_compress.data.readers import READERS
    return sorted(READERS)


def criteria() -> list[str]:
    from rsdet_compress.compress.importance import CRITERIA
    return list(CRITERIA)


def merge_methods() -> tuple[str, ...]:
    from rsdet_compress.engine.slicer import MERGE_METHODS
    return MERGE_METHODS


def agents() -> list[str]:
    from rsdet_compress.search.searchers import SEARCHERS
    return list(SEARCHERS)


def rewards() -> list[str]:
    from rsdet_compress.search.rewards import REWARDS
    return list(REWARDS)


def metrics() -> tuple[str, ...]:
    from rsdet_compress.search.runner import METRICS
    return METRICS


def budget_metrics() -> list[str]:
    from rsdet_compress.search.budget import METRICS
    return list(METRICS)


def recovery() -> tuple[str, ...]:
    from rsdet_compress.search.evaluation import RECOVERY
    return RECOVERY


def latency_runtimes() -> tuple[str, ...]:
    from rsdet_compress.runtime.latency_table import RUNTIMES
    return RUNTIMES


def stage_splits() -> tuple[str, ...]:
    from rsdet_compress.search.budget import STAGE_SPLITS
    return STAGE_SPLITS
