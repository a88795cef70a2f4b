"""Tracing: spans reach an OTLP/HTTP collector when configured; nothing happens when not."""

from __future__ import annotations

import dataclasses

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pytest_aiohttp import AiohttpClient, AiohttpServer

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _spans(bodies: list[bytes]) -> list[Span]:
    spans = []
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans.extend(scope_spans.spans)
    return spans


def _attributes(span: Span) -> dict[str, object]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


async def test_requests_and_flushes_are_exported_over_otlp(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, settings: Settings
) -> None:
    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response()

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(collector)
    app = create_app(
        dataclasses.replace(settings, otel_exporter_otlp_endpoint=str(server.make_url("/")))
    )
    client = await aiohttp_client(app)
    response = await client.post(
        "/increment",
        json={"key": "traced", "value": 1},
        headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
    )
    assert response.status == 202
    assert (await client.get("/api/counters/x")).status == 401
    app[appkeys.WRITE_BEHIND].aggregator.max_pending_keys = 1  # the next new key is refused
    assert (await client.post("/increment", json={"key": "other", "value": 1})).status == 503
    await app[appkeys.WRITE_BEHIND].flush()
    await client.close()  # shutting down exports what is left

    spans = {span.name: span for span in _spans(received)}
    assert {"POST /increment", "GET /api/counters/{key}", "increment.flush"} <= set(spans)
    by_status = {
        _attributes(s)["http.response.status_code"]: s
        for s in _spans(received)
        if s.kind == Span.SPAN_KIND_SERVER
    }
    # The span is chosen by its answer, not by its trace: the trace id is then a real check.
    request_span = by_status[202]
    assert request_span.trace_id.hex() == TRACE_ID, "the caller's trace is continued"
    assert request_span.parent_span_id.hex() == "00f067aa0ba902b7", "under the caller's span"
    assert _attributes(request_span)["http.route"] == "/increment"
    assert by_status[503].trace_id.hex() != TRACE_ID, "a request without traceparent: a new trace"
    assert _attributes(spans["increment.flush"])["increment.keys"] == 1
    assert by_status[503].status.code == by_status[503].status.STATUS_CODE_ERROR
    assert by_status[202].status.code != by_status[202].status.STATUS_CODE_ERROR


async def test_tracing_is_absent_when_not_configured(settings: Settings) -> None:
    plain = create_app(settings)
    traced = create_app(
        dataclasses.replace(settings, otel_exporter_otlp_endpoint="http://127.0.0.1:1")
    )
    assert appkeys.TRACER_PROVIDER not in plain
    assert len(traced.middlewares) == len(plain.middlewares) + 1
    traced[appkeys.TRACER_PROVIDER].shutdown()  # no span was made: nothing to export
