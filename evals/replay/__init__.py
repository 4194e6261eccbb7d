"""Replay evaluation: the project's own policies (Cascade, SGLang's adaptive steps, a vLLM-style
confidence budget, statics) served in simulation against recorded acceptance traces and cost profiles,
so they can be compared at GPU batch sizes without a live model. traces.py records, profiles.py prices
iterations, simulate.py serves, run_replay.py writes the report."""
