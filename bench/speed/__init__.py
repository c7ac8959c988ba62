"""Speed: what bench.compare runs (one worker process per row), the backends over each stack's own training functions, the parity checks, and the GPU run (bench.speed.gpu)."""
