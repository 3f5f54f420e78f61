"""Experiments: `diffusionx eval` (quality and cost of a mode), `compare` (every mode on the same prompts)
and `search` (EC-Diff's two-stage greedy search). They run the served workflows on in-process tiers, so
what they measure is what is served. May import everything in `diffusionx` (workflows, engine, shapes);
never Ray. The serving benchmarks run against HTTP and live in `clients.bench`.
"""
