"""Sampling: schedule, Euler steps with true CFG (denoise) and the step caches that wrap the block loop."""
