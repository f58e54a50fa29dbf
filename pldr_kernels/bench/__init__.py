"""Benchmark harness of pldr-kernels (`pldr-bench`, `python -m pldr_kernels.bench`).

Modules: :mod:`.timing` (clocks, interleaved measurement, percentiles, progress),
:mod:`.memory` (peak extra memory of a call), :mod:`.agreement` (the DESIGN §4 check run before
timing), :mod:`.contestants` (pldr_kernels, reference, eager, SDPA backends, FlexAttention),
:mod:`.ops_suite`, :mod:`.generate_suite`, :mod:`.report` (table, Markdown, JSON, plot).
"""
