"""fabric.serve: deployments behind an HTTP gateway, with dynamic batching and autoscaling.

    from fabric import serve

    @serve.deployment(num_replicas=1)
    class Echo:
        def __call__(self, body):
            return {"got": body}

    handle = serve.run(Echo.bind(), name="echo", route_prefix="/echo")   # gateway on 127.0.0.1:8000
    handle.remote({"x": 1}).result()

See docs/serving.md. The gateway (starlette, uvicorn) is imported only in its own process.
"""
from .api import DeploymentHandle, delete, run, shutdown, status
from .batching import batch
from .deployment import Application, Deployment, deployment
from .onnx import onnx
from .replica import Request

__all__ = ["deployment", "Deployment", "Application", "batch", "run", "status", "delete", "shutdown", "onnx",
           "DeploymentHandle", "Request"]
