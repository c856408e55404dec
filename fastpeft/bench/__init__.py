"""fastpeft's benchmark suite (``fastpeft bench``).

Modules: :mod:`.cli` (the command), :mod:`.timing` (the measuring method),
:mod:`.cases` (case registry and op cases), :mod:`.e2e` (training-step cases),
:mod:`.runner` (runs cases, collects the JSON), :mod:`.report` (table, JSON,
chart, comparison), :mod:`.readme` (README performance section from
``benchmarks/results/*.json``).  Importing this package imports nothing heavy.
"""
