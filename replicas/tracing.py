"""OpenTelemetry: one trace per request, from the serving replica's HTTP front into the engine.

The SDK is configured from the standard environment (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME`, `OTEL_TRACES_EXPORTER`, ...) when an endpoint is set; otherwise spans
are created but go nowhere. The context crosses the Ray call as a W3C `traceparent`
mapping (into the engine process: a `cacheopt_traceparent` extra argument). Attribute
names follow vLLM's `gen_ai.*` where they exist. Imported only where tracing happens (the
cluster, and the vLLM adapter once a request brings a trace context).
"""

from __future__ import annotations

import contextlib
import os

from opentelemetry import trace
from opentelemetry.propagate import extract, inject

_configured = False


def configure_from_environment() -> None:
    """Install an OTLP exporter once per process when the environment asks for one.

    The protocol is `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (default http/protobuf), written
    back to the environment so that vLLM, which installs its own provider in its engine
    process from the same variables (with grpc as its default), exports the same way. A
    provider installed first (vLLM's) is used as it is."""
    global _configured
    if _configured:
        return
    _configured = True
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = protocol
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                        "cacheopt")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def get_tracer(name: str):
    configure_from_environment()
    return trace.get_tracer(name)


def inject_context(span) -> dict:
    carrier: dict = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def start_span_from_traceparent(tracer, name: str, traceparent: str, attributes: dict):
    return tracer.start_span(name, context=extract({"traceparent": traceparent}), attributes=attributes)


@contextlib.contextmanager
def span_from_context(tracer, name: str, carrier: dict, attributes: dict):
    with tracer.start_as_current_span(name, context=extract(carrier or {}), attributes=attributes) as span:
        yield span
