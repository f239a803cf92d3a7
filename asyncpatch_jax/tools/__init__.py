"""Developer tools run as `python -m asyncpatch_jax.tools.NAME`: the import-graph check (`deps`)
and the level-statistics figures (`level_stats`). Nothing in the library imports them."""
