"""The embedded shapes world: procedural data, a deterministic judge, training and sampling helpers.
`data` and `judge` import numpy and Pillow only; `train` and `sample` add torch, diffusers and
`diffusionx.models.tokenizer`. Never Ray, and nothing from the serving side (engine, workflows)."""
