"""MLflow records of a search: one parent run, one nested run per candidate, never lost, never twice.

Uses ``MlflowClient`` with explicit run ids (no global "active run"), so a
resumed search appends to the same parent. A candidate whose logging fails
(store unreachable) is kept in ``pending`` (saved with the search checkpoint)
and written on the next successful call; a write that failed half-way (run
created, metrics not) is replaced, not duplicated, on the retry. If the store
is still down at the end, anything pending goes to ``pending.jsonl`` in the
search folder and ``--resume RUN_ID`` uploads it later.

Only what is about searches lives here; the store, experiment, artifact root
and key/value flattening are :mod:`rsdet_compress.tracking.mlflow_tracker`'s.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from rsdet_compress.atomic import write_text
from rsdet_compress.errors import UserError
from rsdet_compress.tracking.mlflow_tracker import (
    DEFAULT_EXPERIMENT,
    PARENT_TAG,
    experiment_id,
    log_metrics_to,
    log_params_to,
    logging_limits,
    store_client,
)

# every store call of the logbook goes through this name (tests swap it for a store that goes down)
_client = store_client


def _short_http(fn: Callable) -> Callable:
    """Run a logbook method under short HTTP limits: with mlflow's defaults (7 retries, exponential back-off)
    every call to a stopped server would stall the search for minutes instead of queueing the candidate."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with logging_limits():
            return fn(*args, **kwargs)
    return wrapper


def candidate_record(cand, group_sizes: dict[str, int], stage: str = "") -> dict:
    """Everything one nested run holds: params (policy summary), metrics, the policy JSON."""
    # imported here, not at the top: `compare` reads searches through this module without torch
    from rsdet_compress.compress.quant import FLOAT_BITS
    policy = cand.policy
    bits = [b for spec in policy.layers.values() for b in
            (spec["weight_bits"] if isinstance(spec["weight_bits"], list) else [spec["weight_bits"]])]
    sparsity = [1 - len(policy.groups[g]["keep_idx"]) / n if g in policy.groups else 0.0
                for g, n in group_sizes.items()]
    metrics = {"map50": cand.metrics.get("map50"), "map50_95": cand.metrics.get("map50_95"),
               "reward": cand.reward, "size_bytes": cand.cost.size_bytes, "params": cand.cost.params,
               "flops": cand.cost.flops, "bops": cand.cost.bops, "compression_ratio": cand.ratios["size"],
               "bops_ratio": cand.ratios["bops"], "flops_ratio": cand.ratios["flops"],
               "eval_seconds": cand.metrics.get("eval_seconds", cand.seconds),
               **{k: cand.metrics[k] for k in ("recover_seconds", "output_error", "repeat_of") if k in cand.metrics},
               **({"latency_ms": cand.cost.latency_ms, "latency_ratio": cand.ratios["latency"]}
                  if "latency" in cand.ratios else {}),
               **{f"usage.{k}": v for k, v in cand.usage.items()}}
    params = {"episode": cand.episode, "stage": stage or "search",
              "mean_weight_bits": round(sum(bits) / len(bits), 3) if bits else FLOAT_BITS,
              "mean_sparsity": round(sum(sparsity) / len(sparsity), 4) if sparsity else 0.0,
              "pruned_groups": len(policy.groups), "skipped_blocks": len(policy.skipped),
              "quantized_layers": len(policy.layers)}
    return {"episode": cand.episode, "params": params, "metrics": metrics, "policy": policy.to_dict()}


class Logbook:
    """Parent run + nested candidate runs in one experiment of one store."""

    def __init__(self, uri: str, experiment: str = DEFAULT_EXPERIMENT, parent: str | None = None):
        self.uri, self.experiment = uri, experiment
        self.parent = parent
        self.pending: list[dict] = []

    @_short_http
    def start(self, name: str, params: dict, tags: dict) -> str:
        """Create the parent run (status RUNNING) and return its id."""
        client = _client(self.uri)
        exp_id = experiment_id(client, self.experiment, self.uri)
        run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        self.parent = run.info.run_id
        log_params_to(client, self.parent, params)
        return self.parent

    @_short_http
    def children(self) -> list:
        """Active nested runs of the parent (all candidates logged so far)."""
        client = _client(self.uri)
        exp_id = client.get_run(self.parent).info.experiment_id
        return client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent}'",
                                  max_results=50000)

    @_short_http
    def forget_from(self, episode: int) -> int:
        """Delete nested runs of episodes >= ``episode`` (logged after the last checkpoint): no duplicates."""
        client = _client(self.uri)
        stale = [r for r in self.children() if int(r.data.tags.get("episode", -1)) >= episode]
        for r in stale:
            client.delete_run(r.info.run_id)
        return len(stale)

    def log_candidate(self, record: dict) -> bool:
        """Write (or queue) one candidate; returns True when everything queued is in MLflow."""
        self.pending.append(record)
        return self.flush()

    @_short_http
    def flush(self) -> bool:
        while self.pending:
            try:
                self._write(self.pending[0])
            except Exception:  # noqa: BLE001 - store down: keep it for later, the search goes on
                return False
            self.pending.pop(0)
        return True

    def _write(self, rec: dict) -> None:
        client = _client(self.uri)
        exp_id = client.get_run(self.parent).info.experiment_id
        if rec.get("attempted"):  # an earlier try may have created the run before the store went away
            for r in self.children():
                if int(r.data.tags.get("episode", -1)) == rec["episode"]:
                    client.delete_run(r.info.run_id)
        rec["attempted"] = True
        run = client.create_run(exp_id, run_name=f"candidate-{rec['episode']:04d}",
                                tags={PARENT_TAG: self.parent, "episode": str(rec["episode"]),
                                      "stage": rec["params"].get("stage", "")})
        rid = run.info.run_id
        log_params_to(client, rid, rec["params"])
        log_metrics_to(client, rid, rec["metrics"])
        client.log_text(rid, json.dumps(rec["policy"], indent=1), "policy.json")
        client.set_terminated(rid, "FINISHED")

    @_short_http
    def update_parent(self, metrics: dict, step: int) -> None:
        try:
            log_metrics_to(_client(self.uri), self.parent, metrics, step)
        except Exception:  # noqa: BLE001 - best-so-far curves are a convenience; candidates are not
            pass

    @_short_http
    def finish(self, artifacts: list[Path], status: str = "FINISHED", fallback: Path | None = None) -> bool:
        """Attach artifacts and end the parent run; False (and ``fallback`` JSONL of what is unwritten) if the
        store is down: the parent stays RUNNING until a resume finishes it."""
        ok = self.flush()
        if ok:
            try:
                client = _client(self.uri)
                for path in artifacts:
                    client.log_artifact(self.parent, str(path))
                client.set_terminated(self.parent, status)
            except Exception:  # noqa: BLE001 - store down at the very end: the files are on disk
                ok = False
        if fallback is not None:
            if ok:
                fallback.unlink(missing_ok=True)
            else:
                write_text(fallback, "".join(json.dumps(r) + "\n" for r in self.pending))
        return ok


@_short_http
def load_search(uri: str, run_id: str) -> tuple[str, dict, list[dict]]:
    """(agent name, parent tags, candidate records) of one search's parent run, from MLflow."""
    client = _client(uri)
    try:
        parent = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - mlflow raises its own exception types per backend
        raise UserError(f"no MLflow run {run_id!r} in {uri}") from None
    if parent.data.tags.get("stage") != "search":
        raise UserError(f"run {run_id} is not a search (tag stage={parent.data.tags.get('stage')!r})")
    book = Logbook(uri, parent=run_id)
    recs = []
    for r in book.children():
        params = dict(r.data.params)
        for k in ("mean_weight_bits", "mean_sparsity"):
            if k in params:
                params[k] = float(params[k])
        recs.append({"episode": int(r.data.tags.get("episode", -1)), "params": params, "metrics": dict(r.data.metrics)})
    recs.sort(key=lambda r: r["episode"])
    return parent.data.tags.get("agent", "search"), dict(parent.data.tags), recs
