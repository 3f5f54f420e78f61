"""Models: the registry of named model specs, loading through diffusers `from_pretrained` (one clear error
when a checkpoint is missing), the CLIP tokenizer writer, the tiny random pipelines for tests, the
`diffusionx models` command, and the shipped weights of the embedded shapes pair (`models/shapes/`, data,
not code). May import `diffusionx.requests`, torch, diffusers and transformers; never Ray, and nothing
from the other subpackages (except `shapes.train`'s DDIM settings for the tiny pipelines).
"""
