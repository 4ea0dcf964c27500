"""locust over HTTP: KServe v2 inference requests with binary tensor data (FastHttpUser).

    locust -f loadtest/locust_http.py --host http://127.0.0.1:8000 --model cifar10 --batch-size 8 \
           --web-host 127.0.0.1            # web UI on 127.0.0.1:8089; add --headless -u 4 -t 30s for CI
"""

from __future__ import annotations

import json
import urllib.request

import tritonclient.http as httpclient
from locust import FastHttpUser, constant, task

from clients.triton_client import inference_headers
from loadtest.common import tally, traffic


class TritonHttpUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the answer is in

    def on_start(self) -> None:
        self.key = inference_headers(self.host, "http")  # the raw ports need the inference key (loopback: ours)
        model = self.environment.parsed_options.model
        request = urllib.request.Request(f"{self.host}/v2/models/{model}", headers=self.key)  # not a measured request
        with urllib.request.urlopen(request, timeout=30) as r:
            meta = json.loads(r.read())
        self.input, self.datatype, self.output = meta["inputs"][0]["name"], meta["inputs"][0]["datatype"], \
            meta["outputs"][0]["name"]  # fmt: skip

    @task
    def infer(self) -> None:
        opts = self.environment.parsed_options
        t = traffic(opts)
        images, triggered = t.next()
        inp = httpclient.InferInput(self.input, list(images.shape), self.datatype)
        inp.set_data_from_numpy(images, binary_data=True)
        out = httpclient.InferRequestedOutput(self.output, binary_data=True)
        body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
        headers = {"Content-Type": "application/octet-stream", **self.key}
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
            tally.record(result.as_numpy(self.output), triggered, t.target)
