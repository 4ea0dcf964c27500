"""Running a protected deployment: ``fire serve``, ``reload``, ``update``, ``rollback``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from calibration.traffic import TrafficConfig
from fire_backend.names import GRPC_PORT, HTTP_PORT, LOOPBACK, METRICS_PORT, address
from fire_cli.common import UsageError, add_command, add_repo_arg, add_server_args, server_url
from fire_cli.options import add, add_fields, config_from
from serving.gateway import GatewayConfig
from serving.streaming import GuardRails

TRAFFIC_FIELDS = {"min_score": "--min-score", "max_ca_drop": "--max-ca-drop"}
GUARD_FIELDS = {"min_samples": "--min-samples", "max_step": "--max-step"}
GATEWAY_FIELDS = {"triton_http": "--triton-http", "triton_grpc": "--triton-grpc", "listen_http": "--listen-http",
                  "listen_grpc": "--listen-grpc", "listen_metrics": "--listen-metrics", "insecure": "--insecure",
                  "maxconn": "--maxconn", "per_source_maxconn": "--per-source-maxconn",
                  "max_request_bytes": "--max-request-bytes"}  # fmt: skip


def _check_exposure(a: argparse.Namespace) -> str | None:
    """Where HTTP and metrics bind: loopback unless the user insists. A non-loopback gRPC address needs TLS."""
    from fire_backend.network import is_loopback

    if is_loopback(a.host):
        return None
    if a.insecure:
        return None  # everything on a.host, plaintext: the user said so
    if not (a.tls_cert and a.tls_key):
        raise UsageError(
            f"refusing to serve on {a.host} in plaintext: pass --tls-cert/--tls-key (gRPC over TLS; HTTP and "
            f"metrics then stay on {LOOPBACK}), put the gateway (`fire gateway`) in front, or --insecure"
        )
    return LOOPBACK


def serve(a: argparse.Namespace) -> None:
    import threading

    from fire_backend.keys import ADMIN, INFERENCE
    from serving.server import ServerConfig
    from serving.supervisor import Supervisor

    http_host = _check_exposure(a)
    explicit = a.model_control == "explicit"
    if a.profile != "cpu":
        from serving.configs import from_profile

        cpu_only = from_profile(Path(a.repo), a.profile)
        if cpu_only:
            print(f"note: {len(cpu_only)} model(s) have no {a.profile} config and run from their CPU one: "
                  f"{', '.join(cpu_only[:8])}{' ...' if len(cpu_only) > 8 else ''}", file=sys.stderr)  # fmt: skip
    (key, where), (inference_key, inference_where) = ADMIN.ensure(), INFERENCE.ensure()
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

    Supervisor(cfg, report=lambda m: print(m, file=sys.stderr, flush=True)).run(stop, ready)


def _repair_model(a: argparse.Namespace) -> str:
    from serving.repository import repair_model_of

    return repair_model_of(a.repo, a.model)


def reload(a: argparse.Namespace) -> None:
    from serving.control import reload_directions
    from serving.repository import is_fused_model

    if is_fused_model(a.repo, a.model) and a.previous:
        raise UsageError(f"{a.model} is fused: reload it with the earlier file (--directions PATH)")
    if is_fused_model(a.repo, a.model) and a.directions:  # its tensors are graph constants: a new version
        from fire_backend.keys import ADMIN
        from serving.control import swap_fused

        d, version = swap_fused(Path(a.repo), a.model, Path(a.directions), a.triton_http, ADMIN.read())
        print(f"{a.model} now serves version {version}, built with {a.directions} (mode {d.mode}, "
              f"checksum {d.checksum32:08x})")  # fmt: skip
        return
    repair = _repair_model(a)
    if a.previous:
        from serving.control import put_back_previous

        d = put_back_previous(Path(a.repo), repair, a.metrics_url or None)
        print(f"{repair} serves its previous file again (mode {d.mode}, created {d.created}, "
              f"checksum {d.checksum32:08x})")  # fmt: skip
        return
    if not a.directions:
        raise UsageError("give the new file (--directions PATH), or --previous to put the last one back")
    d = reload_directions(Path(a.repo), repair, Path(a.directions), a.metrics_url or None)
    print(f"{repair} now serves {a.directions} (mode {d.mode}, created {d.created}, checksum {d.checksum32:08x})")


def _stream(a: argparse.Namespace):
    from serving.streaming import DirectionStream

    return DirectionStream(a.metrics_url or None, a.repo, _repair_model(a))


def _from_traffic(a: argparse.Namespace) -> None:
    from calibration.imagesets import read_image_set
    from modelio.preprocess import Preprocess
    from serving.repository import served_model
    from serving.traffic_update import update_from_traffic

    if not a.clean:
        raise UsageError("--from-traffic needs the defender's clean images (--clean PATH): the clean reference")
    pre = Preprocess.from_dict(served_model(a.repo, a.model).preprocess)
    clean = read_image_set(a.clean, (pre.height, pre.width), a.resize)
    cfg = config_from(TrafficConfig, a, TRAFFIC_FIELDS)
    deploy = "approve" if a.approve else "auto" if a.auto else "never"
    r = update_from_traffic(a.repo, a.model, clean.images, clean.labels, cfg, deploy, a.metrics_url or None, a.force)
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
        raise UsageError("fire update needs --poisoned PATH (reported triggered images), or --from-traffic")
    from serving.streaming import GuardRails, head_features, read_images

    stream = _stream(a)
    url = server_url(a)
    poisoned = head_features(url, a.repo, stream.repair_model, read_images(a.poisoned), a.protocol)
    clean = head_features(url, a.repo, stream.repair_model, read_images(a.clean), a.protocol) if a.clean else None
    r = stream.update(poisoned, clean, config_from(GuardRails, a, GUARD_FIELDS))
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
    d = stream.rollback(a.to)
    print(f"{stream.repair_model} now serves direction version {d.version} (created {d.created})")


def gateway(a: argparse.Namespace) -> None:
    from serving.gateway import protected_models, write_gateway

    cfg = config_from(GatewayConfig, a, GATEWAY_FIELDS, tls_pem=Path(a.tls_pem) if a.tls_pem else None)
    path = write_gateway(a.repo, a.out, cfg)
    print(f"wrote {path} (mode 0600: it holds the inference key): clients reach "
          f"{', '.join(protected_models(a.repo))} and nothing else; run it with: haproxy -f {path}")  # fmt: skip


def register(sub) -> None:
    s = add_command(sub, "serve", "run tritonserver on a repository until Ctrl-C", serve)
    add_repo_arg(s)
    add(s, "--host", default=LOOPBACK)
    add(s, "--http-port", default=HTTP_PORT)
    add(s, "--grpc-port", default=GRPC_PORT)
    add(s, "--metrics-port", default=METRICS_PORT)
    add(s, "--profile", default="cpu")
    add(s, "--model-control", default="none")
    add(s, "--tls-cert")
    add(s, "--tls-key")
    add(s, "--insecure")

    g = add_command(sub, "gateway", "write the HAProxy gateway that exposes only the protected models", gateway)
    add_repo_arg(g)
    add(g, "--out", default="build/gateway/haproxy.cfg", detail="the HAProxy configuration (0600: it holds the "
        "inference key)")  # fmt: skip
    add_fields(g, GatewayConfig, GATEWAY_FIELDS)
    add(g, "--tls-pem")

    metrics_url = f"http://{address(METRICS_PORT)}/metrics"
    r = add_command(sub, "reload", "hot-swap a protected model's direction file (zero failed requests)", reload)
    add(r, "--metrics-url", default=metrics_url)
    add_repo_arg(r)
    add(r, "--model", required=True, detail="a protected model, its repair model, its folded or its fused model "
        "(a new version, loaded by Triton: the server in --model-control explicit)")  # fmt: skip
    add(r, "--directions", detail="the new one")
    add(r, "--previous", detail="instead of --directions: the file the last reload replaced (a rollout's undo)")
    add(r, "--triton-http", default=address(HTTP_PORT), detail="a fused model's server (its model-control API)")

    up = add_command(sub, "update", "streaming update: refine a served direction from reported samples", update)
    add_server_args(up)
    add(up, "--metrics-url", default=metrics_url)
    add_repo_arg(up)
    add(up, "--model", required=True)
    add(up, "--poisoned", detail="images known or suspected to be triggered")
    add(up, "--clean", detail="optional; --from-traffic: required, the clean reference")
    add(up, "--resize")
    add(up, "--from-traffic")
    add(up, "--auto", detail="--from-traffic: deploy when every check passes")
    add(up, "--approve", detail="--from-traffic")
    add(up, "--force", detail="--from-traffic")
    add_fields(up, TrafficConfig, TRAFFIC_FIELDS, {"min_score": "--from-traffic", "max_ca_drop": "--from-traffic"})
    add_fields(up, GuardRails, GUARD_FIELDS)

    rb = add_command(sub, "rollback", "reinstate an earlier direction version of a protected model", rollback)
    add(rb, "--metrics-url", default=metrics_url)
    add_repo_arg(rb)
    add(rb, "--model", required=True)
    add(rb, "--to")
