"""Policy: pure decision functions with no model and no I/O: the strength predictor (how much noise a
preview needs) and the router (strength and steps against the cloud load and a latency target). May import
numpy, Pillow, pydantic and pyrate_limiter's rate algorithm only; everything here is unit-tested with plain
values.
"""
