"""The pipeline's steps, each a readable top-to-bottom function, one module per command:
`inspect`, `factorize`, `compress` (and `distill`), `evaluate`, `export`, `bench`, and `demo`,
which runs them all on real handwritten digits.

What several commands share lives in `pipelines/common/`, the one module a command's module
may import from another part of `pipelines/` (`tests/test_layering.py` checks it). Nothing is
re-exported here, so that a command imports only its own step.
"""
