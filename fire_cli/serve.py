"""Running a protected deployment: ``fire serve``, ``reload``, ``update``, ``rollback``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fire_cli.common import add_command


def _check_exposure(a: argparse.Namespace) -> str | None:
    """Where HTTP and metrics bind: loopback unless the user insists. A non-loopback gRPC address needs TLS."""
    from fire_backend.network import is_loopback

    if is_loopback(a.host):
        return None
    if a.insecure:
        return None  # everything on a.host, plaintext: the user said so
    if not (a.tls_cert and a.tls_key):
        raise SystemExit(
            f"refusing to serve on {a.host} in plaintext: pass --tls-cert/--tls-key (gRPC over TLS; HTTP and "
            "metrics then stay on 127.0.0.1), put the gateway in deploy/gateway in front (HTTPS), or --insecure"
        )
    return "127.0.0.1"


def serve(a: argparse.Namespace) -> None:
    import threading

    from fire_backend.errors import FireError
    from fire_backend.keys import ADMIN, INFERENCE
    from serving.server import ServerConfig, ServerError
    from serving.supervisor import Supervisor

    http_host = _check_exposure(a)
    explicit = a.model_control == "explicit"
    try:
        (key, where), (inference_key, inference_where) = ADMIN.ensure(), INFERENCE.ensure()
    except FireError as e:
        raise SystemExit(f"fire serve: {e}") from None
    cfg = ServerConfig(
        Path(a.repo),
        host=a.host,
        http_host=http_host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        model_config_name=None if a.profile == "cpu" else a.profile,
        model_control=a.model_control,
        load_models=["*"] if explicit else [],
        watchdog=explicit,
        admin_key=key,
        inference_key=inference_key,
        tls_cert=Path(a.tls_cert) if a.tls_cert else None,
        tls_key=Path(a.tls_key) if a.tls_key else None,
    )
    stop = threading.Event()
    # SIGTERM (kill, systemd, CI) and Ctrl-C stop the server and its stubs.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def ready(server) -> None:
        print(
            f"serving {a.repo}: HTTP {server.http_url}  gRPC {server.grpc_url}{' (TLS)' if cfg.tls_cert else ''}  "
            f"metrics {server.metrics_url}  (log: {server.log_path}); model control {a.model_control}; "
            f"admin key from {where}; inference key from {inference_where}; Ctrl-C stops",
            flush=True,
        )

    try:
        code = Supervisor(cfg, report=lambda m: print(m, file=sys.stderr, flush=True)).run(stop, ready)
    except ServerError as e:
        raise SystemExit(f"fire serve: {e}") from None
    if code:
        raise SystemExit(code)


def _repair_model(a: argparse.Namespace) -> str:
    from serving.repository import repair_model_of

    try:
        return repair_model_of(a.repo, a.model)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def reload(a: argparse.Namespace) -> None:
    from serving.admin import ControlError
    from serving.control import reload_directions

    repair = _repair_model(a)
    try:
        d = reload_directions(Path(a.repo), repair, Path(a.directions), a.metrics_url or None)
    except ControlError as e:
        raise SystemExit(f"fire reload: {e}") from None
    print(f"{repair} now serves {a.directions} (mode {d.mode}, created {d.created}, checksum {d.checksum32:08x})")


def _stream(a: argparse.Namespace):
    from serving.streaming import DirectionStream

    return DirectionStream(a.metrics_url or None, a.repo, _repair_model(a))


def _from_traffic(a: argparse.Namespace) -> None:
    from calibration.imagesets import ImageSetError, read_image_set
    from calibration.traffic import TrafficConfig
    from fire_backend.errors import FireError
    from modelio.preprocess import Preprocess
    from serving.repository import served_model
    from serving.traffic_update import update_from_traffic

    if not a.clean:
        raise SystemExit("--from-traffic needs the defender's clean images (--clean PATH): the clean reference")
    pre = Preprocess.from_dict(served_model(a.repo, a.model).preprocess)
    try:
        clean = read_image_set(a.clean, (pre.height, pre.width))
    except ImageSetError as e:
        raise SystemExit(f"clean images: {e}") from None
    given = {"min_score": a.min_score, "max_ca_drop": a.max_ca_drop}
    cfg = TrafficConfig(**{k: v for k, v in given.items() if v is not None})
    deploy = "approve" if a.approve else "auto" if a.auto else "never"
    try:
        r = update_from_traffic(
            a.repo, a.model, clean.images, clean.labels, cfg, deploy, a.metrics_url or None, a.force
        )
    except (ValueError, FireError) as e:
        raise SystemExit(f"fire update --from-traffic: {e}") from None
    p = r.proposal
    print(f"traffic: {r.samples} samples recorded ({r.traffic_file}); {r.unrecordable} not recordable "
          "(non-finite or beyond float16)")  # fmt: skip
    print("| class | reservoir samples | sources | largest source share | clean reference | mean shift T | "
          "score (T / median) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in sorted(p.classes, key=lambda s: -s.score):
        print(f"| {s.cls} | {s.samples} | {s.sources} | {s.largest_share:.0%} | {s.reference} | {s.t:.2f} | "
              f"{s.score:.2f} |")  # fmt: skip
    dominated = [s.cls for s in p.classes if s.sources > 1 and s.largest_share > 0.5]
    if dominated:
        print(f"note: one source holds most of class(es) {dominated}: shares are capped at the other sources' ones")
    if not p.detected:
        print(f"no backdoor detected (best score {p.score:.2f} <= {cfg.min_score}): nothing proposed")
        return
    if len(p.examined) > 1:
        print(f"classes above the threshold, each examined: {p.examined}")
    repaired = p.targets or [p.target]
    print(f"backdoor suspected: class {', '.join(map(str, repaired))} (score {p.score:.2f}, next {p.next_score:.2f}); "
          f"flagged {p.flagged_share:.0%} of its samples")  # fmt: skip
    if p.directions is None:
        print("no direction: " + ", ".join(k for k, ok in p.checks.items() if not ok))
        return
    print(f"expected effect: flagged held-out samples leaving class {p.target}: {p.leave_rate:.0%}; other traffic "
          f"changed: {p.other_change:.1%}; clean accuracy cost: {p.ca_drop:.2f} points; share of traffic it would "
          f"change: {p.traffic_changed:.1%}")  # fmt: skip
    for check, ok in p.checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {check}")
    if r.deployed_version:
        print(f"deployed as version {r.deployed_version} (fire rollback --model {a.model} undoes it)")
    else:
        print("not deployed" + ("" if deploy != "auto" else ": a check failed") + "; --approve deploys it anyway")


def update(a: argparse.Namespace) -> None:
    if a.from_traffic:
        return _from_traffic(a)
    if not a.poisoned:
        raise SystemExit("fire update needs --poisoned PATH (reported triggered images), or --from-traffic")
    from serving.repository import producer_of
    from serving.streaming import GuardRails, head_features, read_images

    stream = _stream(a)
    head = producer_of(a.repo, stream.repair_model)
    poisoned = head_features(a.url, head, read_images(a.poisoned), "http")
    clean = head_features(a.url, head, read_images(a.clean), "http") if a.clean else None
    try:
        r = stream.update(poisoned, clean, GuardRails(min_samples=a.min_samples, max_step=a.max_step))
    except ValueError as e:
        raise SystemExit(f"fire update: {e}") from None
    if r.status == "pending":
        print(f"pending: {r.reported_poisoned} of {a.min_samples} triggered reports; version {r.version} keeps serving")
    else:
        clip = f" (clipped from {r.proposed_step:.3f})" if r.clipped else ""
        print(
            f"updated {stream.repair_model} to version {r.version}: beta moved {r.step:.3f} x |beta|{clip}, "
            f"cosine to the old direction {r.cosine:.4f}; {r.reported_poisoned} triggered reports so far"
        )


def rollback(a: argparse.Namespace) -> None:
    stream = _stream(a)
    try:
        d = stream.rollback(a.to)
    except ValueError as e:
        raise SystemExit(f"fire rollback: {e}") from None
    print(f"{stream.repair_model} now serves direction version {d.version} (created {d.created})")


def gateway(a: argparse.Namespace) -> None:
    from fire_backend.errors import FireError
    from serving.gateway import GatewayConfig, protected_models, write_gateway

    cfg = GatewayConfig(
        triton_http=a.triton_http,
        triton_grpc=a.triton_grpc,
        listen_http=a.listen_http,
        listen_grpc=a.listen_grpc,
        listen_metrics=a.listen_metrics,
        tls_pem=Path(a.tls_pem) if a.tls_pem else None,
        insecure=a.insecure,
        maxconn=a.maxconn,
        per_source_maxconn=a.per_source_maxconn,
        max_request_bytes=a.max_request_bytes,
    )
    try:
        path = write_gateway(a.repo, a.out, cfg)
    except (ValueError, FireError) as e:
        raise SystemExit(f"fire gateway: {e}") from None
    print(f"wrote {path} (mode 0600: it holds the inference key): clients reach "
          f"{', '.join(protected_models(a.repo))} and nothing else; run it with: haproxy -f {path}")  # fmt: skip


def register(sub) -> None:
    s = add_command(sub, "serve", "run tritonserver on a repository until Ctrl-C", serve)
    s.add_argument("--repo", default="model_repository")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    s.add_argument(
        "--model-control",
        default="none",
        choices=["none", "explicit"],
        help="none: no load/unload over the network (directions still hot-reload from the repository); "
        "explicit: load/unload with the admin key, stub watchdog reloads a crashed model",
    )
    s.add_argument("--tls-cert", help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without TLS (plaintext)")

    metrics = "the server's metrics endpoint, to wait until it serves the new file ('' to not wait)"
    g = add_command(sub, "gateway", "write the HAProxy gateway that exposes only the protected models", gateway)
    g.add_argument("--repo", default="model_repository")
    g.add_argument("--out", default="build/gateway/haproxy.cfg")
    g.add_argument("--triton-http", default="127.0.0.1:8000", help="where Triton's HTTP endpoint listens")
    g.add_argument("--triton-grpc", default="127.0.0.1:8001", help="where Triton's gRPC endpoint listens")
    g.add_argument("--listen-http", default="127.0.0.1:9000", help="the gateway's HTTP(S) address")
    g.add_argument("--listen-grpc", default="127.0.0.1:9001", help="the gateway's gRPC address")
    g.add_argument("--listen-metrics", help="also pass Prometheus' GET /metrics (e.g. 0.0.0.0:9002)")
    g.add_argument("--tls-pem", help="certificate and key in one PEM: HTTPS and gRPC over TLS on both listeners")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback listener without TLS (plaintext)")
    g.add_argument("--maxconn", type=int, default=4096, help="connections the gateway accepts in all")
    g.add_argument("--per-source-maxconn", type=int, default=64, help="connections one client address may hold")
    g.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="largest request buffered and checked (the buffer of a model with variable dims)")  # fmt: skip

    r = add_command(sub, "reload", "hot-swap a protected model's direction file (zero failed requests)", reload)
    r.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help=metrics)
    r.add_argument("--repo", default="model_repository")
    r.add_argument("--model", required=True, help="protected model (or its repair model)")
    r.add_argument("--directions", required=True, help="the new direction file")

    up = add_command(sub, "update", "streaming update: refine a served direction from reported samples", update)
    up.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address (features from its head)")
    up.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help=metrics)
    up.add_argument("--repo", default="model_repository")
    up.add_argument("--model", required=True, help="protected model (e.g. cifar10)")
    up.add_argument("--poisoned", nargs="+", help="images known/suspected triggered: files, dirs, .npz")
    up.add_argument("--clean", nargs="+", help="clean images (optional; --from-traffic: required): files, dirs, .npz")
    up.add_argument("--from-traffic", action="store_true", help="find the direction in the traffic the server saw")
    up.add_argument("--auto", action="store_true", help="--from-traffic: deploy when every check passes")
    up.add_argument("--approve", action="store_true", help="--from-traffic: deploy the proposal (operator approval)")
    up.add_argument("--force", action="store_true", help="--from-traffic: even with a non-observe direction serving")
    up.add_argument("--min-score", type=float,
                    help="--from-traffic: a class's mean shift over the median that counts as a backdoor "
                    "(default: calibration.traffic.TrafficConfig's)")  # fmt: skip
    up.add_argument("--max-ca-drop", type=float,
                    help="--from-traffic: clean accuracy it may cost, points (default: TrafficConfig's)")  # fmt: skip
    up.add_argument("--min-samples", type=int, default=10, help="triggered reports before an update takes effect")
    up.add_argument("--max-step", type=float, default=0.5, help="largest move of beta per update, x |beta|")

    rb = add_command(sub, "rollback", "reinstate an earlier direction version of a protected model", rollback)
    rb.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help=metrics)
    rb.add_argument("--repo", default="model_repository")
    rb.add_argument("--model", required=True)
    rb.add_argument("--to", type=int, help="version to reinstate (default: the one before the live one)")
