"""jaxlm.serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the
continuous-batching Scheduler (jaxlm.infer.scheduler). The HTTP layer only.

    python -m jaxlm.serve --hf DIR --port 8000          # see serve/__main__.py
    app = create_app(scheduler, tokenizer=tok, model_name="tiny", stop_tokens=(eos,))

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus). The official `openai` client works against it.

  app.py       the FastAPI app factory and endpoints
  protocol.py  request models, the OpenAI error shape, stop-string-aware output text
  loop.py      ServingLoop: the one thread that owns the (not thread-safe) Scheduler
  chat.py      chat templates, from jaxlm.model.io.chat (an HF directory's, rendered as
               transformers does, or a built-in default "<|role|>\\ncontent\\n")
  metrics.py   Prometheus gauges/histograms/counters in a registry per app
"""
from .app import create_app
from .chat import DEFAULT_TEMPLATE, ChatTemplate, load_template
from .loop import Aborted, Overloaded, ServingLoop, ShuttingDown, Stream
from .metrics import Metrics

__all__ = ["Aborted", "ChatTemplate", "DEFAULT_TEMPLATE", "Metrics", "Overloaded",
           "ServingLoop", "ShuttingDown", "Stream", "create_app", "load_template"]
