"""Fixed-capacity replay buffer of (state, action, reward, next state, done) in numpy arrays.

A ring buffer (AMC/HAQ's ``SequentialMemory`` without the window logic, which
they never use): the oldest transitions are overwritten once full. Sampling
uses its own seeded ``numpy.random.Generator`` so a search can be resumed
bit-for-bit from ``state_dict()``.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class ReplayBuffer:
    """Ring buffer of transitions; ``sample`` draws uniformly without replacement (with it if too few)."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int, seed: int | np.random.SeedSequence = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.state_dim, self.action_dim = int(capacity), int(state_dim), int(action_dim)
        self.states = np.zeros((capacity, state_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_states = np.zeros((capacity, state_dim), np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, state: np.ndarray, action: np.ndarray, reward: float, next_state: np.ndarray, done: bool) -> None:
        """Store one transition, overwriting the oldest when full."""
        i = self.pos
        self.states[i] = state
        self.actions[i] = action
        self.rewards[i] = reward
        self.next_states[i] = next_state
        self.dones[i] = float(done)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """A uniform minibatch: arrays ``states``, ``actions``, ``rewards``, ``next_states``, ``dones``."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self.rng.choice(self.size, size=batch_size, replace=batch_size > self.size)
        return {k: getattr(self, k)[idx] for k in ("states", "actions", "rewards", "next_states", "dones")}

    def state_dict(self) -> dict[str, Any]:
        """Filled part of the arrays (copies), write position and sampler RNG state."""
        n = self.size
        return {
            "capacity": self.capacity, "pos": self.pos, "size": n,
            "states": self.states[:n].copy(), "actions": self.actions[:n].copy(), "rewards": self.rewards[:n].copy(),
            "next_states": self.next_states[:n].copy(), "dones": self.dones[:n].copy(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; the capacity must match."""
        if int(d["capacity"]) != self.capacity:
            raise ValueError(f"replay capacity mismatch: saved {d['capacity']}, this buffer {self.capacity}")
        n = int(d["size"])
        for k in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, k)[:n] = np.asarray(d[k])
            getattr(self, k)[n:] = 0
        self.size, self.pos = n, int(d["pos"])
        self.rng.bit_generator.state = d["rng"]
