"""The pipeline's steps, each a readable top-to-bottom function, one module per command:
`inspect`, `factorize`, `compress` (and `distill`), `evaluate`, `export`, `bench`, and `demo`,
which runs them all on real handwritten digits.

Nothing is re-exported here, so that a command imports only its own step.
"""
