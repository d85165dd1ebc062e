"""Scores of the policies a search has already evaluated: a proposal seen before is not evaluated again.

A learning agent near a tight budget keeps landing on the policy the budget projection makes of
its actions: airbus SkyNet under ``size=0.125,flops=0.5`` proposed one policy for 3 of its first 8
candidates, each 2-4 minutes of fast recovery on this CPU. The repeat still becomes a candidate
(a nested run, a reward the agent learns from), with the first evaluation's metrics, no evaluation
time of its own and ``repeat_of`` naming the episode that measured it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence


def policy_key(policy) -> str:
    """The same key for the same policy, however its dicts were built."""
    return hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()


class ScoreMemo:
    """Policy key -> the episode that evaluated it and its metrics; kept in the search checkpoint."""

    def __init__(self, known: dict | None = None):
        self.known: dict[str, dict] = dict(known or {})

    def score(self, proposals: Sequence, evaluate: Callable[[list], list[dict]]) -> list[dict]:
        """Metrics for each proposal (``.episode``, ``.policy``); ``evaluate`` sees each new policy once."""
        keys = [policy_key(p.policy) for p in proposals]
        fresh: dict[str, object] = {}
        for p, k in zip(proposals, keys):
            if k not in self.known and k not in fresh:
                fresh[k] = p
        for (k, p), metrics in zip(fresh.items(), evaluate([p.policy for p in fresh.values()])):
            self.known[k] = {"episode": p.episode, "metrics": metrics}
        return [self._metrics(p.episode, self.known[k]) for p, k in zip(proposals, keys)]

    @staticmethod
    def _metrics(episode: int, first: dict) -> dict:
        if first["episode"] == episode:
            return first["metrics"]
        spent = {k: 0.0 for k in ("eval_seconds", "recover_seconds")}
        return {**first["metrics"], **spent, "repeat_of": first["episode"]}

    def state_dict(self) -> dict:
        return self.known
