#!/usr/bin/env python3
"""A real OTLP logs receiver for plugvisor's tests, built from the official protos.

Serves OTLP/HTTP (POST /v1/logs, application/x-protobuf) or OTLP/gRPC (LogsService/Export),
decodes each request with the generated classes of the `opentelemetry-proto` package, and
appends every log record it takes to OUT as one JSON line: its attributes, body, event_name and
times. It answers 503 / UNAVAILABLE while the file FAIL exists (so a test can make the collector
fail without stopping it), and writes READY (its pid) once it listens.

    otlp_receiver.py --protocol http|grpc --port N --out records.jsonl --fail fail-flag --ready ready
"""

import argparse
import json
import os
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
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


def serve_http(args):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/logs":
                self.send_response(404)
                self.end_headers()
                return
            if os.path.exists(args.fail):
                self.send_response(503)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"down")
                return
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

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            if os.path.exists(args.fail):
                context.abort(grpc.StatusCode.UNAVAILABLE, "down")
            take(request, args.out)
            return logs_service_pb2.ExportLogsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
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
