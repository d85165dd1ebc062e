"""Where candidates are evaluated: in this process, or by Ray workers (``search --workers K``).

Ray is what teams that tune models already run (its Tune library is what
ultralytics and most HPO tools use), so the search scales out on it rather than on
anything home-made. Each worker is a Ray actor that loads the float weights and
decodes its calibration and reward chips once, as the in-process evaluator does,
then scores the policies it is sent and returns their metrics; the driver keeps
the agent, the budget, MLflow and the checkpoint. Actors restart when they die
and their task is retried (``max_restarts`` / ``max_task_retries`` unlimited),
so a killed worker re-queues its candidate instead of losing it. One GPU per
worker where the device is a GPU.

With one worker and no Ray address nothing of Ray is touched: the search is the
sequential in-process one, candidate for candidate.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from rsdet_compress.compress.policy import Policy
from rsdet_compress.errors import UserError
from rsdet_compress.search.evaluation import CandidateEvaluator, build_evaluator


class LocalPool:
    """Every candidate in this process, one after the other (``--workers 1``, no Ray address)."""

    remote = False

    def __init__(self, evaluator: CandidateEvaluator):
        self.evaluator = evaluator

    def map(self, policies: list[Policy]) -> list[dict]:
        return [self.evaluator(p) for p in policies]

    def close(self) -> None:
        pass


class CandidateWorker:
    """A Ray actor: one search's evaluator, built once, scoring the policies it is sent."""

    def __init__(self, settings: dict, threads: int):
        torch.set_num_threads(threads)
        torch.manual_seed(settings["seed"])
        self.evaluator = build_evaluator(settings)

    def evaluate(self, policy: dict) -> dict:
        return self.evaluator(Policy.from_dict(policy, source="search driver"))

    def pid(self) -> int:
        return os.getpid()


class RayPool:
    """``workers`` Ray actors, each evaluating one candidate at a time; results come back in proposal order."""

    remote = True

    def __init__(self, settings: dict, workers: int, address: str | None):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise UserError("--workers > 1 or --ray-address needs Ray: pip install 'rsdet-compress[cluster]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        gpu = settings["device"] not in ("cpu", "")
        if self.started:
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:  # a private local cluster, reachable on the loopback interface only
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                             _node_ip_address="127.0.0.1")
            except Exception as e:  # noqa: BLE001 - ConnectionError, timeouts, version mismatches...
                raise UserError(f"cannot reach Ray cluster {address or '(local)'}: "
                                f"{str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__}") \
                    from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = max(1, cpus // workers)
        actor = ray.remote(num_cpus=threads, num_gpus=1 if gpu else 0, max_restarts=-1,
                           max_task_retries=-1)(CandidateWorker)
        self.actors = [actor.remote(settings, threads) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, policies: list[Policy]) -> list[dict]:
        return list(self.pool.map(lambda a, p: a.evaluate.remote(p.to_dict()), policies))

    def pids(self) -> list[int]:
        """Process ids of the worker actors (tests kill one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


def evaluator_pool(cfg, evaluator: CandidateEvaluator) -> LocalPool | RayPool:
    """The in-process pool for one worker and no cluster, else Ray workers built from ``cfg``'s settings."""
    if cfg.workers == 1 and not cfg.ray_address:
        return LocalPool(evaluator)
    settings = asdict(cfg)
    # a worker's working folder is not the driver's: send absolute paths (the same mounts on every machine)
    for key in ("weights", "data"):
        if Path(settings[key]).exists():
            settings[key] = str(Path(settings[key]).resolve())
    return RayPool(settings, cfg.workers, cfg.ray_address)
