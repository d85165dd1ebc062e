"""AJPQ/ABCP search: environment, agents, rewards, searchers."""
