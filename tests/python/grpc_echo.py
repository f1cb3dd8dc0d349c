#!/usr/bin/env python3
"""A real gRPC server and client (grpcio: gRPC's C core, Debian's python3-grpcio) for usher's
end-to-end test of gRPC through the sidecar. No generated code: the methods take and return
raw bytes.

  grpc_echo.py serve --port P --name NAME [--not-serving-if FILE]
      Serves /usher.test.Echo/Unary (answers "NAME: request"), /usher.test.Echo/Stream
      (bidirectional: answers each message the same way as it comes) and
      /usher.test.Echo/Fail (FAILED_PRECONDITION), each with the trailing metadata
      x-instance: NAME, and gRPC's health service, grpc.health.v1.Health/Check, for "" and
      "usher.test.Echo" (NOT_SERVING while FILE exists; NOT_FOUND for other services), on
      127.0.0.1:P until SIGTERM.

  grpc_echo.py call --target HOST:PORT --authority SERVICE [--calls N]
      Makes N concurrent unary calls, one bidirectional stream, one failing call, and one
      call to the unknown service "nope", over one channel per authority, and prints what
      came back as JSON.
"""

import argparse
import json
import os
import signal
import sys
from concurrent import futures

import grpc

SERVICE = "usher.test.Echo"


def health_check(not_serving_if):
    """grpc.health.v1.Health/Check on raw bytes: HealthCheckRequest { string service = 1; }
    in, HealthCheckResponse { ServingStatus status = 1; } out (SERVING = 1, NOT_SERVING = 2)."""

    def check(request, context):
        service = ""
        if request[:1] == b"\x0a" and len(request) >= 2 and request[1] < 0x80:
            service = request[2 : 2 + request[1]].decode()
        if service not in ("", SERVICE):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        serving = not (not_serving_if and os.path.exists(not_serving_if))
        return b"\x08\x01" if serving else b"\x08\x02"

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )


def serve(port, name, not_serving_if):
    prefix = name.encode() + b": "

    def unary(request, context):
        context.set_trailing_metadata((("x-instance", name),))
        return prefix + request

    def stream(requests, context):
        context.set_trailing_metadata((("x-instance", name),))
        for request in requests:
            yield prefix + request

    def fail(request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler, health_check(not_serving_if)))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1))
    server.wait_for_termination()


def error(call):
    try:
        call()
    except grpc.RpcError as e:
        return [e.code().name, e.details()]
    return ["OK", ""]


def call(target, authority, calls):
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    pending = [unary.future(f"hello {i}".encode(), timeout=10) for i in range(calls)]
    answers, instances = [], set()
    for future in pending:
        answers.append(future.result().decode())
        instances.update(v for k, v in future.trailing_metadata() if k == "x-instance")
    stream = channel.stream_stream(f"/{SERVICE}/Stream")
    replies = stream(iter([b"a", b"b", b"c"]), timeout=10)
    streamed = [reply.decode() for reply in replies]
    failed = error(lambda: channel.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10))
    unknown_channel = grpc.insecure_channel(target, options=[("grpc.default_authority", "nope")])
    unknown = error(lambda: unknown_channel.unary_unary(f"/{SERVICE}/Unary")(b"", timeout=10))
    print(json.dumps({
        "unary": answers,
        "instances": sorted(instances),
        "stream": streamed,
        "fail": failed,
        "unknown": unknown,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--not-serving-if")
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.port, args.name, args.not_serving_if)
    else:
        call(args.target, args.authority, args.calls)


if __name__ == "__main__":
    main()
