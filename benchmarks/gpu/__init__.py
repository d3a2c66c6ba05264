"""The one-shot device check (``bash benchmarks/gpu/run.sh``): its Python stages live in :mod:`.check`."""
