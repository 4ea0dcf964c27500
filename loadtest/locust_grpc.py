"""locust over gRPC: a User around tritonclient.grpc, cooperative under gevent, firing locust's
request events itself (locust has no built-in gRPC client).

    locust -f loadtest/locust_grpc.py --host 127.0.0.1:8001 --model cifar10 --batch-size 8 --web-host 127.0.0.1
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any gRPC object exists: let gevent schedule gRPC's I/O

import time  # noqa: E402

import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, constant, task  # noqa: E402

from clients.triton_client import inference_headers  # noqa: E402
from fire_backend.names import GRPC_PORT, address  # noqa: E402
from fire_backend.network import host_of  # noqa: E402
from loadtest.common import tally, traffic  # noqa: E402


class TritonGrpcUser(User):
    wait_time = constant(0)  # closed loop: the next request as soon as the answer is in

    def on_start(self) -> None:
        host = self.host or address(GRPC_PORT)
        port = host.rsplit(":", 1)[-1] if ":" in host.split("//")[-1] else str(GRPC_PORT)
        self.client = grpcclient.InferenceServerClient(url=f"{host_of(host)}:{port}")
        self.headers = inference_headers(host, "grpc")  # the raw ports need the inference key (loopback: ours)
        meta = self.client.get_model_metadata(self.environment.parsed_options.model, headers=self.headers)
        self.input, self.datatype, self.output = meta.inputs[0].name, meta.inputs[0].datatype, meta.outputs[0].name

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        opts = self.environment.parsed_options
        t = traffic(opts)
        images, triggered = t.next()
        inp = grpcclient.InferInput(self.input, list(images.shape), self.datatype)
        inp.set_data_from_numpy(images)
        start, exc, logits = time.perf_counter(), None, None
        try:
            outputs = [grpcclient.InferRequestedOutput(self.output)]
            result = self.client.infer(opts.model, [inp], outputs=outputs, headers=self.headers)
            logits = result.as_numpy(self.output)
        except Exception as e:  # an error response is a failure in locust's statistics
            exc = e
        self.environment.events.request.fire(
            request_type="grpc",
            name=opts.model,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0 if logits is None else logits.nbytes,
            exception=exc,
            context={},
        )
        if logits is not None:
            tally.record(logits, triggered, t.target)
