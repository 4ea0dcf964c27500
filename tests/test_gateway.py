"""The gateway's request reading (native/fire_gateway.lua) inside a real HAProxy, against protobuf's
own parser, protobuf C++'s reading of tags, and a real tritonserver.

A probe frontend runs the gateway's Lua on each request and answers with its decision (the model the
request may reach, or why not) instead of forwarding it, so thousands of encodings are checked in
seconds; the end-to-end tests then attack a real server through the real gateway."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from clients import FireClient
from fire_backend.directions import DirectionFile
from serving.gateway import LUA, GatewayConfig, GatewayError, haproxy_config, spec_lua, write_gateway
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer, free_ports
from zoo.data import to_tensor_batch

from .conftest import triggered_subset
from .protowire import CppParseError, cpp_model_name, grpc_frame, ld, tag, varint
from .test_reliability import pipeline

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/test.sh installs it)"
)

INFER = "/inference.GRPCInferenceService/ModelInfer"
SPECS = {  # protected models of several shapes; "cifar10_tail" and "ocr_head" are not among them
    "cifar10": {"max_batch": 64, "inputs": [{"name": "INPUT", "datatype": "FP32", "dims": [3, 32, 32]}],
                "outputs": ["LOGITS"]},
    "ocr": {"max_batch": 8, "inputs": [{"name": "x", "datatype": "FP32", "dims": [3, -1, -1]}],
            "outputs": ["save_infer_model/scale_0.tmp_1"]},
    "u8": {"max_batch": 4, "inputs": [{"name": "image", "datatype": "UINT8", "dims": [32, 32, 3]}],
           "outputs": ["probs"]},
}  # fmt: skip
PROBE_BUFSIZE = 1 << 20


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    import socket

    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("haproxy did not listen")


class Probe:
    """HTTP/1.1 keep-alive connection to the probe frontend; ``decide`` returns (model or None, why)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def decide(self, path: str, body: bytes, headers: dict | None = None) -> tuple[str | None, str]:
        for attempt in range(2):
            try:
                self.conn.request(
                    "POST", path, body=body, headers={"Content-Length": str(len(body)), **(headers or {})}
                )
                r = self.conn.getresponse()
                r.read()
                model = r.getheader("x-fire-model") or None
                return model, r.getheader("x-fire-why") or ""
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    spec = d / "spec.lua"
    spec.write_text(spec_lua(SPECS, PROBE_BUFSIZE, GatewayConfig()))
    (port,) = free_ports(1)
    cfg = d / "probe.cfg"
    cfg.write_text(f"""global
    tune.bufsize {PROBE_BUFSIZE + (64 << 10)}
    lua-load {spec}
    lua-load {LUA}
defaults
    mode http
    timeout client 10s
    timeout server 10s
    timeout connect 5s
    timeout http-request 10s
frontend probe
    bind 127.0.0.1:{port}
    option http-buffer-request
    http-request lua.fire_grpc if {{ path_beg /inference.GRPCInferenceService/ }}
    http-request lua.fire_http if {{ path_beg /v2/models/ }}
    http-request return status 200 hdr x-fire-model "%[var(txn.fire_model)]" hdr x-fire-why "%[var(txn.fire_why)]"
""")
    proc = subprocess.Popen(
        ["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_port(port, proc)
    yield Probe(port)
    proc.terminate()
    proc.wait(10)


# -- gRPC: random and adversarial encodings of ModelInferRequest --------------------------------------


def _input(name: str, datatype: str, shape: list[int], **kw) -> bytes:
    packed = b"".join(varint(d) for d in shape)
    return ld(1, name.encode()) + ld(2, datatype.encode()) + ld(3, packed, **kw)


def _valid_fields(rng: random.Random, model: str) -> list[bytes]:
    """The fields of a valid request for a SPECS model (or a same-shaped one for another name)."""
    spec = SPECS.get(model, SPECS["cifar10"])
    t = spec["inputs"][0]
    dims = [d if d > 0 else rng.randint(1, 64) for d in t["dims"]]
    shape = [rng.randint(1, spec["max_batch"]), *dims]
    size = int(np.prod(shape)) * {"FP32": 4, "UINT8": 1}[t["datatype"]]
    fields = [ld(1, model.encode()), ld(5, _input(t["name"], t["datatype"], shape)), ld(7, b"\0" * size)]
    if rng.random() < 0.5:
        fields.append(ld(6, ld(1, spec["outputs"][0].encode())))
    if rng.random() < 0.3:
        fields.append(ld(3, b"request-%d" % rng.randint(0, 99)))
    rng.shuffle(fields[1:])  # any order: protobuf does not care
    return fields


def _mutate(rng: random.Random, fields: list[bytes]) -> list[bytes]:
    kind = rng.randrange(14)
    other = rng.choice(["cifar10_tail", "cifar10_head", "ocr_head", "cifar10", "u8"])
    at = rng.randrange(len(fields) + 1)
    if kind == 0:  # over-long tag on the model name
        fields[0] = ld(1, fields[0][2:], tag_pad=rng.randint(1, 4))
    elif kind == 1:  # the bypass: a second model_name whose tag carries bits above 32
        fields.insert(at, ld(1, other.encode(), high=rng.choice([1, 2, 7, 15, 2**20, 2**31])))
    elif kind == 2:  # a plain second model_name (protobuf keeps the last)
        fields.insert(at, ld(1, other.encode()))
    elif kind == 3:  # field numbers near the limits, any wire type
        field = rng.choice([2**29 - 1, 2**29, 2**29 + 1, 2**32 - 1, 8, 15, 16, 1000, 0])
        wire = rng.randrange(8)
        payload = {0: varint(rng.randint(0, 2**64 - 1)), 1: bytes(8), 2: varint(3) + b"abc", 5: bytes(4)}.get(wire, b"")
        fields.insert(at, tag(field, wire, pad=rng.choice([0, 0, 1])) + payload)
    elif kind == 4:  # over-long length of the name
        name = fields[0][2:]
        fields[0] = ld(1, name, len_pad=rng.randint(1, 3))
    elif kind == 5:  # a length that lies
        i = rng.randrange(len(fields))
        f = fields[i]
        fields[i] = f[:1] + varint(max(0, len(f) - 2 + rng.choice([-3, -1, 1, 2, 100]))) + f[2:]
    elif kind == 6:  # flip a byte
        i = rng.randrange(len(fields))
        b = bytearray(fields[i])
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        fields[i] = bytes(b)
    elif kind == 7:  # bad shapes
        t = SPECS["cifar10"]["inputs"][0]
        shape = rng.choice([[0, 3, 32, 32], [65, 3, 32, 32], [2**32 + 1, 3, 32, 32], [1, 3, 32, 2**40], [-1, 3, 32, 32],
                            [1, 3, 32], [1, 3, 32, 32, 1]])  # fmt: skip
        fields = [f for f in fields if not f.startswith(b"\x2a")] + [ld(5, _input(t["name"], "FP32", shape))]
    elif kind == 8:  # raw contents that do not match the shape
        fields = [f if not f.startswith(b"\x3a") else ld(7, b"\0" * rng.randint(0, 64)) for f in fields]
    elif kind == 9:  # a second input or raw buffer
        tensors = [f for f in fields if f[:1] in (b"\x2a", b"\x3a")]
        fields.insert(at, rng.choice(tensors or fields))
    elif kind == 10:  # truncate or append
        blob = b"".join(fields)
        return (
            [blob[: rng.randrange(len(blob))]]
            if rng.random() < 0.5
            else [blob + bytes(rng.randrange(256) for _ in range(4))]
        )
    elif kind == 11:  # packed shape written unpacked, or an over-long dim
        fields = [f for f in fields if not f.startswith(b"\x2a")]
        unpacked = ld(1, b"INPUT") + ld(2, b"FP32") + b"".join(tag(3, 0) + varint(d, pad=rng.choice([0, 0, 1]))
                                                               for d in [1, 3, 32, 32])  # fmt: skip
        fields.insert(1, ld(5, unpacked))
        fields = [f if not f.startswith(b"\x3a") else ld(7, b"\0" * (3 * 32 * 32 * 4)) for f in fields]
    elif kind == 12:  # request parameters (only priority/timeout are allowed), or a forged source
        key = rng.choice([b"priority", b"timeout", b"fire-source", b"shared_memory_region", b"x"])
        value = rng.choice([tag(2, 0) + varint(5), tag(3, 2) + varint(3) + b"abc", tag(1, 0) + varint(1)])
        fields.insert(at, ld(4, ld(1, key) + ld(2, value)))
    else:  # invalid UTF-8 in the name
        fields[0] = ld(1, b"cifar10\xff")
    return fields


def _reference_name(message: bytes) -> str | None:
    """model_name as both of protobuf's own parsers read it, or None where either fails or they differ."""
    try:
        upb = service_pb2.ModelInferRequest.FromString(message).model_name
        cpp = cpp_model_name(message)
    except (DecodeError, CppParseError):
        return None
    return upb if upb == cpp else None


def test_the_gateway_reads_model_infer_exactly_as_protobuf_does(probe):
    """Seeded random and adversarial encodings: every request the gateway lets through parses with
    protobuf (upb) and with C++'s reading of tags, both naming the model the gateway checked, and
    every unmutated valid request for a protected model passes."""
    rng = random.Random(20261201)
    allowed = refused = valid_passed = 0
    for case in range(4000):
        model = rng.choice(["cifar10", "ocr", "u8", "cifar10_tail"])
        fields = _valid_fields(rng, model)
        mutated = case % 4 != 0
        if mutated:
            for _ in range(rng.randint(1, 3)):
                fields = _mutate(rng, fields)
        message = b"".join(fields)
        got, why = probe.decide(INFER, grpc_frame(message))
        if got is None:
            refused += 1
            assert why, "a refusal carries a reason"
            assert mutated or model not in SPECS, f"case {case}: a valid request for {model} was refused: {why}"
            continue
        allowed += 1
        assert got in SPECS, f"case {case}: allowed an unprotected model {got!r}"
        assert _reference_name(message) == got, (
            f"case {case}: gateway read {got!r}, protobuf {_reference_name(message)!r}"
        )
        valid_passed += not mutated
    assert allowed > 500 and refused > 2000 and valid_passed > 600  # both sides exercised


def test_the_issue_bypass_is_refused(probe):
    """model_name = cifar10, then model_name = cifar10_tail under the 5-byte tag 8a 80 80 80 10."""
    fields = _valid_fields(random.Random(1), "cifar10")
    smuggled = fields[:1] + [ld(1, b"cifar10_tail", high=1)] + fields[1:]
    message = b"".join(smuggled)
    assert b"\x8a\x80\x80\x80\x10" in message
    assert cpp_model_name(message) == "cifar10_tail"  # what Triton serves
    assert probe.decide(INFER, grpc_frame(message)) == (None, "malformed protobuf tag")


def test_grpc_framing_and_per_model_calls(probe):
    msg = b"".join(_valid_fields(random.Random(2), "cifar10"))
    assert probe.decide(INFER, grpc_frame(msg))[0] == "cifar10"
    assert probe.decide(INFER, grpc_frame(msg, compressed=True))[0] is None
    assert probe.decide(INFER, grpc_frame(msg) + grpc_frame(msg))[0] is None  # two messages
    assert probe.decide(INFER, grpc_frame(msg)[:-1])[0] is None  # truncated
    for call in ("ModelReady", "ModelMetadata", "ModelConfig"):
        path = f"/inference.GRPCInferenceService/{call}"
        assert probe.decide(path, grpc_frame(ld(1, b"ocr")))[0] == "ocr"
        assert probe.decide(path, grpc_frame(ld(1, b"ocr") + ld(2, b"1")))[0] == "ocr"
        assert probe.decide(path, grpc_frame(ld(1, b"ocr") + ld(1, b"ocr_head")))[0] is None
        assert probe.decide(path, grpc_frame(ld(1, b"ocr_head")))[0] is None
        assert probe.decide(path, grpc_frame(ld(1, b"ocr") + ld(3, b"x")))[0] is None  # unknown field


# -- HTTP: the JSON inference header -------------------------------------------------------------------


def _http_body(shape, data=None, binary: int | None = None, **extra) -> tuple[bytes, dict]:
    inp = {"name": "INPUT", "shape": shape, "datatype": "FP32"}
    if binary is not None:
        inp["parameters"] = {"binary_data_size": binary}
    else:
        inp["data"] = data if data is not None else [0.5] * int(np.prod(shape))
    body = {"inputs": [inp], **extra}
    text = json.dumps(body).encode()
    if binary is None:
        return text, {}
    return text + b"\0" * binary, {"Inference-Header-Content-Length": str(len(text))}


def _http(probe: Probe, body: bytes, headers: dict | None = None, model: str = "cifar10") -> tuple[str | None, str]:
    return probe.decide(f"/v2/models/{model}/infer", body, headers)


def test_http_inference_headers_fit_the_model(probe):
    ok = [
        _http_body([1, 3, 32, 32]),
        _http_body([2, 3, 32, 32], binary=2 * 3072 * 4),
        _http_body([1, 3, 32, 32], outputs=[{"name": "LOGITS", "parameters": {"binary_data": True}}]),
        _http_body([1, 3, 32, 32], parameters={"binary_data_output": True, "priority": 1}),
        _http_body([1, 3, 32, 32], data=[[[[0.5] * 32] * 32] * 3]),  # nested data
    ]
    for body, headers in ok:
        assert _http(probe, body, headers) == ("cifar10", ""), body[:120]
    bombs = [  # the shapes of the crash, and their relatives
        _http_body([1, 3, 32, 2**40], data=[0.5, 0.5]),
        _http_body([2**32 + 1, 3, 32, 32], data=[0.5] * 3072),
        _http_body([1, 3, 32, 32], data=[0.5, 0.5]),
        _http_body([65, 3, 32, 32], binary=65 * 3072 * 4),
        _http_body([1, 3, 32, 32], binary=16),
        _http_body([1, 3, 32, 32.0]),
        _http_body([1, 3, 32, -32]),
        _http_body([True, 3, 32, 32]),
    ]
    for body, headers in bombs:
        got, why = _http(probe, body, headers)
        assert got is None and why, body[:120]


def test_http_inference_json_is_read_strictly(probe):
    good, _ = _http_body([1, 3, 32, 32])
    cases = {
        "duplicate key": good.replace(b'"name": "INPUT"', b'"name": "INPUT", "name": "cifar10_tail"'),
        "unknown key": good.replace(b'"datatype"', b'"dtype": 1, "datatype"'),
        "trailing bytes": good + b"x",
        "forged source": good[:-1] + b', "parameters": {"fire-source": "10.0.0.1"}}',
        "shared memory": good[:-1] + b', "parameters": {"shared_memory_region": "r"}}',
        "another output": good[:-1] + b', "outputs": [{"name": "FEATURES"}]}',
        "bad escape": good.replace(b'"INPUT"', b'"INP\\u00c9T"'),
        "deep nesting": good.replace(b'"data": [', b'"data": ' + b"[" * 40, 1),
        "leading zero": good.replace(b"[1, 3", b"[01, 3"),
    }
    for what, body in cases.items():
        assert _http(probe, body)[0] is None, what
    assert _http(probe, good, {"Content-Encoding": "gzip"})[0] is None
    assert _http(probe, good, model="cifar10_tail")[0] is None


def test_http_fuzz_never_lets_through_what_json_reads_otherwise(probe):
    """Random byte-level mutations of valid requests: whatever passes is valid JSON without duplicate
    keys whose input fits the model."""
    rng = random.Random(7)
    base, _ = _http_body([1, 3, 32, 32])
    passed = 0

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "duplicate key passed the gateway"
        return dict(pairs)

    for _ in range(600):
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            b[i] = rng.choice(b'[]{}",:.-+eE0123456789 \\xtrufalsn')
        got, _ = _http(probe, bytes(b))
        if got is None:
            continue
        passed += 1
        req = json.loads(bytes(b), object_pairs_hook=no_duplicates)
        (inp,) = req["inputs"]
        assert inp["name"] == "INPUT" and inp["shape"] == [1, 3, 32, 32] and len(inp["data"]) == 3072
    assert passed > 0  # mutations in the data values still pass


# -- end to end: a real server behind the real gateway ------------------------------------------------


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("gw_repo")
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, record_traffic=True)], repo)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        http_port, grpc_port = free_ports(2)
        cfg = GatewayConfig(
            triton_http=server.http_url,
            triton_grpc=server.grpc_url,
            listen_http=f"127.0.0.1:{http_port}",
            listen_grpc=f"127.0.0.1:{grpc_port}",
            client_timeout_s=3,
        )
        path = write_gateway(repo, tmp_path_factory.mktemp("gw") / "haproxy.cfg", cfg)
        proc = subprocess.Popen(
            ["haproxy", "-f", str(path), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        _wait_port(http_port, proc)
        yield server, cfg, a, repo
        proc.terminate()
        proc.wait(10)


def _raw_grpc(url: str, method: str, body: bytes, metadata=()) -> bytes:
    import grpc

    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)  # fmt: skip
        return call(body, timeout=10, metadata=metadata)


def test_the_smuggled_tail_request_is_refused_end_to_end(served):
    import grpc

    server, cfg, a, _ = served
    feats = np.zeros((1, *a.info.feature_shape), np.float32)
    req = service_pb2.ModelInferRequest(model_name="cifar10")
    req.inputs.add(name="FEATURES", datatype="FP32", shape=list(feats.shape))
    req.raw_input_contents.append(feats.tobytes())
    wire = req.SerializeToString()
    smuggled = wire[:9] + ld(1, b"cifar10_tail", high=1) + wire[9:]
    key = tuple(server.headers("grpc").items())
    answered = service_pb2.ModelInferResponse.FromString(_raw_grpc(server.grpc_url, "ModelInfer", smuggled, key))
    assert answered.model_name == "cifar10_tail"  # to Triton itself (with the key) the tail answers
    with pytest.raises(grpc.RpcError) as e:
        _raw_grpc(cfg.listen_grpc, "ModelInfer", smuggled)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed protobuf tag" in e.value.details()


def test_one_request_cannot_crash_the_server(served):
    server, cfg, a, _ = served
    for shape, data in (([1, 3, 32, 2**40], [0.5, 0.5]), ([2**32 + 1, 3, 32, 32], [0.5] * 3072)):
        body = json.dumps({"inputs": [{"name": "INPUT", "shape": shape, "datatype": "FP32", "data": data}]}).encode()
        req = urllib.request.Request(f"http://{cfg.listen_http}/v2/models/cifar10/infer", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and b"FIRE gateway" in e.value.read()
    assert server.process.poll() is None
    x = to_tensor_batch(a.test.images[:2])
    assert FireClient(cfg.listen_http, "http").infer("cifar10", x).shape == (2, 10)


def test_the_raw_ports_answer_no_model_without_the_inference_key(served):
    """A local account without the key: health only; no half, no metadata, no config. The gateway,
    which holds the key, serves the protected model and nothing else."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, cfg, a, _ = served
    x = to_tensor_batch(a.test.images[:2])
    for proto, url, mod in (("grpc", server.grpc_url, grpcclient), ("http", server.http_url, httpclient)):
        c = mod.InferenceServerClient(url)
        assert c.is_server_live() and c.is_model_ready("cifar10")
        for model in ("cifar10", "cifar10_head", "cifar10_tail", "cifar10_fire"):
            with pytest.raises(InferenceServerException, match="restricted"):
                c.get_model_metadata(model)
            with pytest.raises(InferenceServerException, match="restricted"):
                c.get_model_config(model)
        nokey = FireClient(url, proto, key="not-the-key-at-all")
        for model, name in (("cifar10", "INPUT"), ("cifar10_head", "INPUT")):
            with pytest.raises(InferenceServerException, match="restricted"):
                nokey.infer(model, x, name, "LOGITS")
        np.testing.assert_allclose(  # the operator, with the key, still reaches everything
            FireClient(url, proto).infer("cifar10", x), pipeline(a, x, DirectionFile.load(a.directions)), atol=1e-4
        )
    gw = FireClient(cfg.listen_grpc, "grpc", key="not-the-key-at-all")  # a client's key header is dropped
    assert gw.infer("cifar10", x).shape == (2, 10)


def test_the_gateway_names_the_source_and_drops_forged_headers(served):
    """Triton sees fire-source = the client's address, whatever header the client sends."""
    server, cfg, a, repo = served
    x = to_tensor_batch(np.concatenate([a.test.images[:3], triggered_subset(a, 3)[0]]))
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(cfg.listen_http)
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    c.infer("cifar10", [inp], headers={"fire-source": "10.9.9.9", "Fire-Source": "10.9.9.8"})
    from fire_backend.traffic import TrafficStats

    path = repo / "cifar10_tail" / "traffic.safetensors"
    deadline = time.time() + 20
    while time.time() < deadline and not path.is_file():
        time.sleep(0.2)
    deadline = time.time() + 20
    while time.time() < deadline and "127.0.0.1" not in TrafficStats.load(path)[0].source_names():
        time.sleep(0.2)
    names = TrafficStats.load(path)[0].source_names()
    assert "127.0.0.1" in names and not {"10.9.9.9", "10.9.9.8"} & set(names)  # "": the operator's raw-port calls


def test_a_public_plaintext_gateway_is_refused(tmp_path):
    with pytest.raises(GatewayError, match="plaintext"):
        haproxy_config(SPECS, GatewayConfig(listen_http="0.0.0.0:9000", inference_key="k" * 20), tmp_path / "s.lua")
    text = haproxy_config(SPECS, GatewayConfig(listen_http="0.0.0.0:9000", inference_key="k" * 20, insecure=True),
                          tmp_path / "s.lua")  # fmt: skip
    assert "bind 0.0.0.0:9000" in text


def test_the_gateway_config_is_private(served, tmp_path):
    _, _, _, repo = served
    path = write_gateway(repo, tmp_path / "gw" / "haproxy.cfg", GatewayConfig())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(Path(str(path) + ".spec.lua").stat().st_mode & 0o777) == "0o600"
