"""Engine: the Ray-free serving core of one tier replica. The model loop that forms and merges batches and
admits refinements to step-level batching (`model_loop`), its load bookkeeping (`monitor`), the coalescing
load reporter, the bounded preview cache, and the tier objects that put a loaded model behind a model loop
(`tiers`). May import `diffusionx.requests`, `models`, `sampling` and `policy`; never Ray (the deployments
wrap these objects) and never `workflows`.
"""
