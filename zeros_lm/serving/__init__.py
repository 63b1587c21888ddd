"""``zeros-lm serve``: an OpenAI-compatible streaming server with continuous batching and sessions.

engine.py schedules the streams (continuous batching, chunked prefill; ``ZeroSCache.stack`` and
``ZeroSCache.drop_rows`` join and split their caches), sessions.py keeps conversations' states (in memory, spilled to state files), app.py holds the HTTP
routes, protocol.py the request and response models, metrics.py the Prometheus metrics. See docs/serving.md.
"""

from .app import ServerConfig, create_app, load_model
from .engine import Engine, Job, SamplingParams

__all__ = ["Engine", "Job", "SamplingParams", "ServerConfig", "create_app", "load_model"]
