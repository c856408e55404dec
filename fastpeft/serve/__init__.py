"""``fastpeft serve``: one base model, many LoRA adapters, served over HTTP (FastAPI + uvicorn).

Modules: :mod:`.registry` (loaded adapters and the base models they share), :mod:`.inference` (batched
classification and generation, mixed adapters per batch), :mod:`.scheduler` (the batching queue),
:mod:`.app` (the HTTP endpoints), :mod:`.schemas` (request bodies), :mod:`.metrics` (Prometheus),
:mod:`.page` (the web page at ``/``), :mod:`.cli` (the command).  Nothing in the core imports this
package; the CLI imports it only when ``fastpeft serve`` runs.
"""
