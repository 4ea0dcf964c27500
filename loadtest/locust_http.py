"""locust over HTTP: KServe v2 inference requests with binary tensor data (FastHttpUser).

    locust -f loadtest/locust_http.py --host http://127.0.0.1:8000 --model cifar10 --batch-size 8 \
           --web-host 127.0.0.1            # web UI on 127.0.0.1:8089; add --headless -u 4 -t 30s for CI
"""

from __future__ import annotations

import tritonclient.http as httpclient
from locust import FastHttpUser, constant, task

from clients.triton_client import inference_headers
from loadtest.common import tally, traffic


class TritonHttpUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the answer is in

    @task
    def infer(self) -> None:
        opts = self.environment.parsed_options
        t = traffic(opts)
        images, triggered = t.next()
        inp = httpclient.InferInput("INPUT", list(images.shape), "FP32")
        inp.set_data_from_numpy(images, binary_data=True)
        out = httpclient.InferRequestedOutput("LOGITS", binary_data=True)
        body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
        headers = {"Content-Type": "application/octet-stream", **inference_headers(self.host, "http")}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        with self.client.post(
            f"/v2/models/{opts.model}/infer", data=body, headers=headers, name=opts.model, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200] if resp.text else ''}")
                return
            length = resp.headers.get("Inference-Header-Content-Length")
            result = httpclient.InferenceServerClient.parse_response_body(
                resp.content, header_length=int(length) if length else None
            )
            tally.record(result.as_numpy("LOGITS"), triggered, t.target)
