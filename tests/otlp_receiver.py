#!/usr/bin/env python3
"""A real OTLP logs and traces receiver for plugvisor's tests, built from the official protos.

Serves OTLP/HTTP (POST /v1/logs and /v1/traces, application/x-protobuf) or OTLP/gRPC
(LogsService/Export and TraceService/Export), decodes each request with the generated classes of
the `opentelemetry-proto` package, and appends every log record it takes to OUT as one JSON line
(its attributes, body, event_name and times), every span to SPANS (ids in hex, parent, name,
kind, flags, times, attributes, events, status). It answers 503 / UNAVAILABLE while the file FAIL
exists (so a test can make the collector fail without stopping it), and writes READY (its pid)
once it listens.

    otlp_receiver.py --protocol http|grpc --port N --out records.jsonl --spans spans.jsonl \
        --fail fail-flag --ready ready
"""

import argparse
import json
import os
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

LOCK = threading.Lock()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def take(request, out):
    lines = []
    for rl in request.resource_logs:
        resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                lines.append(
                    json.dumps(
                        {
                            "resource": resource,
                            "scope": sl.scope.name,
                            "event_name": lr.event_name,
                            "time_unix_nano": lr.time_unix_nano,
                            "severity_text": lr.severity_text,
                            "body": any_value(lr.body),
                            "attributes": {kv.key: any_value(kv.value) for kv in lr.attributes},
                        }
                    )
                )
    with LOCK:
        with open(out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def take_spans(request, out):
    lines = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                lines.append(
                    json.dumps(
                        {
                            "resource": resource,
                            "scope": ss.scope.name,
                            "trace_id": sp.trace_id.hex(),
                            "span_id": sp.span_id.hex(),
                            "parent_span_id": sp.parent_span_id.hex(),
                            "trace_state": sp.trace_state,
                            "name": sp.name,
                            "kind": sp.kind,
                            "flags": sp.flags,
                            "start_time_unix_nano": sp.start_time_unix_nano,
                            "end_time_unix_nano": sp.end_time_unix_nano,
                            "attributes": attributes(sp.attributes),
                            "events": [
                                {
                                    "name": e.name,
                                    "time_unix_nano": e.time_unix_nano,
                                    "attributes": attributes(e.attributes),
                                }
                                for e in sp.events
                            ],
                            "status": {"code": sp.status.code, "message": sp.status.message},
                        }
                    )
                )
    with LOCK:
        with open(out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


def serve_http(args):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path not in ("/v1/logs", "/v1/traces"):
                self.send_response(404)
                self.end_headers()
                return
            if os.path.exists(args.fail):
                self.send_response(503)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"down")
                return
            if self.path == "/v1/traces":
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                take_spans(request, args.spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            else:
                request = logs_service_pb2.ExportLogsServiceRequest()
                request.ParseFromString(body)
                take(request, args.out)
                answer = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    ready(args)
    server.serve_forever()


def serve_grpc(args):
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            if os.path.exists(args.fail):
                context.abort(grpc.StatusCode.UNAVAILABLE, "down")
            take(request, args.out)
            return logs_service_pb2.ExportLogsServiceResponse()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            if os.path.exists(args.fail):
                context.abort(grpc.StatusCode.UNAVAILABLE, "down")
            take_spans(request, args.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    ready(args)
    server.wait_for_termination()


def ready(args):
    with open(args.ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(args.ready + ".tmp", args.ready)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--protocol", choices=["http", "grpc"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--spans", required=True)
    p.add_argument("--fail", required=True)
    p.add_argument("--ready", required=True)
    args = p.parse_args()
    # Referenced so a missing package fails here, not at the first request.
    common_pb2.AnyValue()
    if args.protocol == "http":
        serve_http(args)
    else:
        serve_grpc(args)


if __name__ == "__main__":
    sys.exit(main())
