"""The HTTP edge: Open Inference Protocol (KServe V2) REST over the cluster's bus, and the web page.

    from edge import create_app, run_edge
    run_edge("127.0.0.1", 8000, "tcp://127.0.0.1:5555")        # or: python -m edge --port 8000
"""

from edge.app import create_app, run_edge

__all__ = ["create_app", "run_edge"]
