"""Rollout engines: one protocol, a native torch engine and a vLLM engine."""
