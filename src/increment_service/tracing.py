"""Optional OpenTelemetry tracing, on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Off (the default), nothing of OpenTelemetry is imported and no middleware is installed, so
tracing costs nothing. On, every request gets a server span named after its route template
(continuing a W3C ``traceparent`` sent by the client), every flush gets a span, and spans are
exported in batches over OTLP/HTTP from a background thread. Install the extra:
``pip install 'increment-service[tracing]'``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .middleware import route_label

#: The instrumentation name of every span the service makes.
TRACER_NAME = "increment_service"

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_provider(endpoint: str, replica_id: str) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {"service.name": "increment-service", "service.instance.id": replica_id}
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracing_middleware(tracer: Tracer) -> Callable[..., Awaitable[web.StreamResponse]]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_label(request)
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return traced
