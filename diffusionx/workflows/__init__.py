"""Workflows: each mode (preview, edit, refine, cloud, edge, hybrid, ec-diff, diffusionx) written once as
an async function over tier callables (`modes`), and in-process tiers to run them (`local`).

May import `diffusionx.requests`, `models`, `sampling`, `policy` and `engine`; never Ray. The ingress hands
the workflows DeploymentHandle-backed tiers, the experiments hand them in-process ones.
"""
