"""The HTTP edge: Open Inference Protocol (KServe V2) REST over the cluster's bus, and the web page.

    from cluster.role_settings import EdgeSettings
    from edge import create_app, run_edge
    run_edge(EdgeSettings(edge_port=8000))         # or: cluster edge --edge-port 8000 (= python3 -m edge)
    app = create_app(EdgeSettings())               # an ASGI app; create_app(settings, client=...) to bring a client

Modules: app (create_app, run_edge), routes, schemas (the OpenAPI bodies), errors (statuses), body (limit and
encodings), oip, oip_tensors, oip_json (OIP bodies, tensors and JSON text <-> numpy), metrics (Prometheus),
security (tokens, allowed hosts, CORS).
"""

__all__ = ["create_app", "run_edge"]


def __getattr__(name: str):
    """create_app and run_edge, imported when first asked for: `edge.command` (the CLI's `edge` options) stays
    light for every `cluster` command."""
    if name in __all__:
        from edge import app

        return getattr(app, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
