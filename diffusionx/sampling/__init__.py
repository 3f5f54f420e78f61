"""Sampling: the model math. Text-to-image and img2img over lists of requests (`generation`), step-level
batching of refinements of mixed strengths (`step_batching`), and EC-Diff / Hybrid SD split into a cloud
phase and an edge phase (`collaborative`). May import `diffusionx.requests`, `models`, torch and diffusers;
never Ray, and no serving concerns (queues, load, HTTP).
"""
