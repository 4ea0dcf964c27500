"""The production entry point: an HAProxy configuration that lets clients reach the protected models
and nothing else, with requests Triton reads exactly as the gateway checked them.

Triton serves every model in its repository, including the ones a protected model is built from:
a client that calls ``<name>_head`` then ``<name>_tail`` gets the backdoor back. Triton's raw ports
answer inference, metadata and config only with the inference key (``fire_backend.keys``); the gateway
holds that key and adds it to the requests it lets through:

- HTTP: ``/v2/models/<name>[/versions/<v>][/ready|/config|/infer]`` for protected names, server health
  and metadata; anything else (other models, the repository, shared memory, statistics, logging,
  trace) gets 403. An inference body is read whole (``native/fire_gateway.lua``: strict JSON header,
  shapes and byte counts against the model's config) before Triton sees it: no shape Triton would turn
  into an allocation bomb, no compressed body;
- gRPC: server health and metadata, and ModelInfer / ModelReady / ModelMetadata / ModelConfig whose
  request names a protected model, parsed as strict protobuf (canonical varints only, known fields,
  each singular field once) and, for inference, checked like HTTP; anything else gets gRPC status 7
  (PERMISSION_DENIED) or 3 (INVALID_ARGUMENT) with the reason;
- client headers starting ``fire-`` or ``triton-grpc-protocol-`` are dropped; the gateway sets
  ``fire-source`` (the client's address: traffic statistics bound each source's weight by it);
- load: at most ``maxconn`` connections in all and ``per_source_maxconn`` per client address; a body
  must arrive whole within ``client_timeout_s`` (slow bodies never reach Triton); idle keep-alive
  connections are closed after ``keep_alive_s``; requests wait at most ``queue_timeout_s`` for one of
  the ``backend_maxconn`` connections to Triton;
- TLS (a PEM with certificate and key) on both listeners; a non-loopback listener needs it unless
  ``insecure``.

Protected models: the ensembles with a FIRE repair step, and the fused and folded models.
The generated configuration holds the inference key: it is written 0600.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from fire_backend.cache import write_private
from fire_backend.errors import FireError
from fire_backend.keys import INFERENCE
from fire_backend.names import (
    GATEWAY_GRPC_PORT,
    GATEWAY_HEADER_PREFIX,
    GATEWAY_HTTP_PORT,
    GRPC_KEY_PREFIX,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    SOURCE_HEADER,
    address,
)
from fire_backend.network import host_of, is_loopback
from serving.configs import read_config
from serving.repository import PARAM_ROLE, PROTECTED_ROLE, is_repair_model

LUA = Path(__file__).resolve().parent / "native" / "fire_gateway.lua"
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_OPEN = ("ServerLive", "ServerReady", "ServerMetadata")
GRPC_PER_MODEL = ("ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig")
DENIED = "not a protected model or not an allowed call"
DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
               "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip
HEADER_SLACK = 64 << 10  # room in the buffer for the HTTP headers and the JSON inference header


class GatewayError(FireError):
    """The gateway cannot be configured as asked; the message says why."""


def _is_protected(repository: Path, cfg) -> bool:
    steps = [s.model_name for s in cfg.ensemble_scheduling.step]
    if any((repository / s).is_dir() and is_repair_model(repository, s) for s in steps):
        return True  # an ensemble with a FIRE repair step
    role = cfg.parameters[PARAM_ROLE].string_value if PARAM_ROLE in cfg.parameters else ""
    return role == PROTECTED_ROLE


def protected_configs(repository: str | Path) -> list:
    """The ModelConfig of every model a client may call: ensembles with a FIRE repair step, fused and folded."""
    repository = Path(repository)
    configs = [read_config(p) for p in sorted(repository.iterdir()) if (p / "config.pbtxt").is_file()]
    return [cfg for cfg in configs if _is_protected(repository, cfg)]


def protected_models(repository: str | Path) -> list[str]:
    return [cfg.name for cfg in protected_configs(repository)]


def _datatype(cfg, tensor) -> str:
    name = mc.DataType.Name(tensor.data_type).removeprefix("TYPE_")  # Triton's protocol names: TYPE_FP32 -> FP32
    if name not in DTYPE_BYTES:
        raise GatewayError(
            f"{cfg.name}: tensor {tensor.name!r} of type {tensor.data_type} cannot be checked by the gateway"
        )
    return name


def model_spec(cfg) -> dict:
    """What the gateway checks a request for model ``cfg`` against."""
    return {
        "max_batch": int(cfg.max_batch_size),
        "inputs": [
            {"name": t.name, "datatype": _datatype(cfg, t), "dims": [int(d) for d in t.dims]} for t in cfg.input
        ],
        "outputs": [t.name for t in cfg.output],
    }


def largest_request(spec: dict) -> int | None:
    """Bytes of the largest valid request's tensors (binary encoding); None when a dim is variable."""
    total = 0
    for t in spec["inputs"]:
        if any(d < 0 for d in t["dims"]):
            return None
        elements = max(1, spec["max_batch"])
        for d in t["dims"]:
            elements *= d
        total += elements * DTYPE_BYTES[t["datatype"]]
    return total


@dataclass
class GatewayConfig:
    triton_http: str = address(HTTP_PORT)
    triton_grpc: str = address(GRPC_PORT)
    listen_http: str = address(GATEWAY_HTTP_PORT)
    listen_grpc: str = address(GATEWAY_GRPC_PORT)
    triton_metrics: str = address(METRICS_PORT)
    listen_metrics: str | None = None  # e.g. 0.0.0.0:9002: Prometheus' /metrics and nothing else
    tls_pem: Path | None = None  # certificate + key in one PEM: HTTPS and gRPC over TLS
    insecure: bool = False  # allow a non-loopback listener without TLS
    maxconn: int = 4096  # connections the gateway accepts in all (idle ones cost it little)
    per_source_maxconn: int = 64  # connections one client address may hold at once
    backend_maxconn: int = 64  # connections it opens to Triton (complete requests wait for one)
    client_timeout_s: int = 10  # headers and body must arrive within this; idle clients are dropped
    keep_alive_s: int = 2  # an idle keep-alive connection is closed after this
    queue_timeout_s: int = 5  # a complete request waits at most this for a connection to Triton
    max_request_bytes: int = 64 << 20  # the largest request it buffers (and so forwards)
    max_dim: int = 16384  # bound on a variable dim of a model's input
    inference_key: str | None = None  # None: fire_backend.keys.INFERENCE's
    extra: dict = field(default_factory=dict)


def _check_exposure(cfg: GatewayConfig) -> None:
    listeners = [cfg.listen_http, cfg.listen_grpc] + ([cfg.listen_metrics] if cfg.listen_metrics else [])
    public = [addr for addr in listeners if not is_loopback(host_of(addr) or "0.0.0.0")]
    if public and not cfg.tls_pem and not cfg.insecure:
        raise GatewayError(
            f"refusing a plaintext listener on {', '.join(public)}: pass --tls-pem (HTTPS and gRPC over TLS), "
            "or --insecure to accept plaintext"
        )


def buffer_size(specs: dict[str, dict], cfg: GatewayConfig) -> int:
    """The buffer every request must fit in: the largest valid binary request of the protected models,
    plus room for headers; the configured cap where a dim is variable or the request is larger."""
    sizes = [largest_request(s) for s in specs.values()]
    if any(s is None for s in sizes):
        return cfg.max_request_bytes
    return max(256 << 10, min(cfg.max_request_bytes, max(sizes) + HEADER_SLACK))


def spec_lua(specs: dict[str, dict], bufsize: int, cfg: GatewayConfig) -> str:
    """The Lua file that hands the spec to native/fire_gateway.lua (loaded just before it)."""
    text = json.dumps({"models": specs, "max_dim": cfg.max_dim, "max_elements": bufsize, "max_body": bufsize},
                      sort_keys=True)  # fmt: skip
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"-- generated by `fire gateway`: the protected models' configs\nFIRE_GATEWAY_SPEC = [{eq}[{text}]{eq}]\n"


def _names_regex(models: list[str]) -> str:
    return "|".join(re.escape(m) for m in models)


def _header_rules(key_header: str, key: str) -> str:
    """Drop what a client may not send, then add the key and the client's address."""
    return (
        f"    http-request del-header (?i)^({re.escape(GATEWAY_HEADER_PREFIX)}|{re.escape(GRPC_KEY_PREFIX)}) -m reg\n"
        f"    http-request set-header {key_header} {key}\n"
        f"    http-request set-header {SOURCE_HEADER} %[src]\n"
    )


def _http_error(status: int, message: str, verb: str = "return", lf: bool = False) -> str:
    """A JSON error answer in KServe's shape, ``{"error": "..."}`` (``lf``: the message is a log-format)."""
    body = '"{\\"error\\":\\"FIRE gateway: ' + message + '\\"}"'
    kind = "lf-string" if lf else "string"
    status_word = "deny_status" if verb == "deny" else "status"
    return f"http-request {verb} {status_word} {status} content-type application/json {kind} {body}"


def _grpc_error(code: int, message: str) -> str:
    """A trailers-only gRPC answer with ``code`` (7 PERMISSION_DENIED, 3 INVALID_ARGUMENT)."""
    head = "http-request return status 200"  # trailers only: the status in headers, no message
    return f'{head} hdr grpc-status {code} hdr grpc-message "FIRE gateway: {message}"'


def haproxy_config(specs: dict[str, dict], cfg: GatewayConfig, spec_file: Path, lua: Path = LUA) -> str:
    if not specs:
        raise GatewayError("no protected model in the repository: nothing for the gateway to serve")
    _check_exposure(cfg)
    key = cfg.inference_key or INFERENCE.ensure()[0]  # the one `fire serve` uses (created by whichever runs first)
    names = _names_regex(sorted(specs))
    tls = f" ssl crt {cfg.tls_pem}" if cfg.tls_pem else ""
    alpn = " alpn h2" if cfg.tls_pem else ""
    t = cfg.client_timeout_s
    per_source = (
        "    stick-table type ipv6 size 100k expire 30s store conn_cur\n"
        "    tcp-request connection track-sc0 src\n"
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {cfg.per_source_maxconn} }}\n"
    )
    allowed_http = "METH_GET server_paths or METH_GET model_read or METH_POST model_infer"
    why = "%[var(txn.fire_why)]"
    return f"""# FIRE gateway (HAProxy >= 2.6 with Lua), generated by `fire gateway`: protected models only.
# Holds the inference key: keep this file private (it is written 0600).
global
    maxconn {cfg.maxconn}
    tune.bufsize {buffer_size(specs, cfg)}
    lua-load {spec_file}
    lua-load {lua}

defaults
    mode http
    option http-buffer-request
    timeout connect 5s
    timeout client {t}s
    timeout http-request {t}s
    timeout http-keep-alive {cfg.keep_alive_s}s
    timeout server 120s
    timeout queue {cfg.queue_timeout_s}s

frontend fire_http
    bind {cfg.listen_http}{tls}
{per_source}    acl server_paths path /v2 /v2/health/live /v2/health/ready
    acl model_read path_reg ^/v2/models/({names})(/versions/[0-9]+)?(/ready|/config)?$
    acl model_infer path_reg ^/v2/models/({names})(/versions/[0-9]+)?/infer$
    {_http_error(403, DENIED, "deny")} unless {allowed_http}
    http-request wait-for-body time {t}s if model_infer
    http-request lua.fire_http if model_infer
    acl http_named var(txn.fire_model) -m found
    {_http_error(400, why, lf=True)} if model_infer !http_named
{_header_rules(INFERENCE.header, key)}    default_backend triton_http

frontend fire_grpc
    bind {cfg.listen_grpc} proto h2{tls}{alpn}
{per_source}    acl grpc_open path {" ".join(GRPC_SERVICE + m for m in GRPC_OPEN)}
    acl grpc_model path {" ".join(GRPC_SERVICE + m for m in GRPC_PER_MODEL)}
    {_grpc_error(7, DENIED)} unless grpc_open or grpc_model
    http-request wait-for-body time {t}s if grpc_model
    http-request lua.fire_grpc if grpc_model
    acl grpc_named var(txn.fire_model) -m found
    acl grpc_foreign var(txn.fire_why) -m beg "not a protected model"
    {_grpc_error(7, DENIED)} if grpc_model !grpc_named grpc_foreign
    {_grpc_error(3, why)} if grpc_model !grpc_named
{_header_rules(INFERENCE.grpc_header, key)}    default_backend triton_grpc

{_metrics(cfg)}backend triton_http
    server triton {cfg.triton_http} maxconn {cfg.backend_maxconn}

backend triton_grpc
    server triton {cfg.triton_grpc} proto h2 maxconn {cfg.backend_maxconn}
"""


def _metrics(cfg: GatewayConfig) -> str:
    if not cfg.listen_metrics:
        return ""
    return f"""frontend fire_metrics
    bind {cfg.listen_metrics}
    http-request deny deny_status 403 unless METH_GET {{ path /metrics }}
    default_backend triton_metrics

backend triton_metrics
    server triton {cfg.triton_metrics} maxconn 4

"""


def write_gateway(repository: str | Path, out: str | Path, cfg: GatewayConfig | None = None) -> Path:
    """Write the HAProxy configuration (0600: it holds the inference key) and, beside it, the spec of
    the protected models (``<out>.spec.lua``)."""
    cfg = cfg or GatewayConfig()
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = {c.name: model_spec(c) for c in protected_configs(repository)}
    spec_file = out.with_name(out.name + ".spec.lua")
    text = haproxy_config(specs, cfg, spec_file)
    write_private(spec_file, spec_lua(specs, buffer_size(specs, cfg), cfg).encode())
    write_private(out, text.encode())
    return out
