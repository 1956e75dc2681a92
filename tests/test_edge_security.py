"""Who may talk to the edge (edge/security.py): tokens, the admin-token mechanism, the Host allow-list, Origin and
Content-Type of POSTs, CORS preflights, the bearer scheme in the OpenAPI document.

In-process (create_app on tests/test_edge_app.py's FakeBus under Starlette's TestClient), except the last test: a
real TLS edge with tokens, `cluster edge` as its own process in front of a real cluster, driven by unmodified
tritonclient.http with ssl=True (marked `cluster`). The page asking for a token is in tests/test_frontend.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import warnings

import numpy as np
import pytest
from fastapi import APIRouter

from cluster.role_settings import EdgeSettings
from edge import create_app, security
from edge.schemas import error_responses
from edge.security import ADMIN, EdgeSecurity, hosts_for_bind, read_token_file, split_tokens
from tests.edge_http import assert_binary_echo, assert_error, binary_echo_body, echo_body
from tests.harness import start_edge
from tests.test_edge_app import FakeBus, FakeManager

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

TOKEN, OTHER, ADMIN_TOKEN = "tok-user-1", "tok-user-2", "tok-admin"
EDGE = "http://127.0.0.1:8000"
PROTECTED = ["/v2", "/v2/models/echo", "/v2/models/echo/ready", "/v2/models/echo/versions/1", "/agents", "/models"]
PROTECTED += ["/metrics"]
PUBLIC = ["/v2/health/live", "/v2/health/ready", "/"]
INFER = "/v2/models/echo/infer"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def edge_client(base_url: str = EDGE, admin_route: bool = False, **options) -> TestClient:
    """A TestClient on create_app(FakeBus, **options); admin_route: plus a test-only POST /test/admin that needs an
    admin token (as the repository load/unload routes will)."""
    app = create_app(EdgeSettings(**options), client=FakeBus(), manager=FakeManager())
    if admin_route:
        extra = APIRouter()

        @extra.post("/test/admin", dependencies=[ADMIN], responses=error_responses(403))
        async def admin_only() -> dict:
            return {"changed": True}

        app.include_router(extra)
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture
def locked():
    with edge_client(edge_token=[f"{TOKEN},{OTHER}"], edge_admin_token=[ADMIN_TOKEN], admin_route=True) as http:
        yield http


# ---- tokens -----------------------------------------------------------------------------------------------------


def test_every_route_but_health_and_the_page_needs_a_token(locked):
    for path in PROTECTED:
        response = locked.get(path)
        assert_error(response, 401, "Authorization: Bearer")
        assert response.headers["www-authenticate"] == "Bearer", path
        assert locked.get(path, headers=bearer(TOKEN)).status_code == 200, path
    assert_error(locked.post(INFER, json=echo_body([[1.0]])), 401, "token")
    response = locked.post(INFER, json=echo_body([[1.0, 2.0]]), headers=bearer(OTHER))  # the second token
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.0, 2.0]
    for path in PUBLIC:
        assert locked.get(path).status_code == 200, path
    # the API's description stays readable without a token (/docs needs it to offer its Authorize button)
    assert locked.get("/openapi.json").status_code == 200


def test_wrong_or_malformed_tokens_are_refused(locked):
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer ", "Bearer  "):
        response = locked.get("/models", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.headers["www-authenticate"].startswith("Bearer"), header
    response = locked.get("/models", headers=bearer("nope"))
    assert_error(response, 401, "not valid")
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert locked.get("/models", headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200  # scheme any case


def test_admin_token_works_wherever_a_token_does_and_admin_routes_need_it(locked):
    assert locked.get("/models", headers=bearer(ADMIN_TOKEN)).status_code == 200
    assert locked.post(INFER, json=echo_body([[1.0]]), headers=bearer(ADMIN_TOKEN)).status_code == 200
    assert_error(locked.post("/test/admin"), 401, "token")
    assert_error(locked.post("/test/admin", headers=bearer(TOKEN)), 403, "admin token")
    assert locked.post("/test/admin", headers=bearer(ADMIN_TOKEN)).json() == {"changed": True}


def test_admin_routes_refuse_everyone_when_only_plain_tokens_are_set():
    with edge_client(edge_token=[TOKEN], admin_route=True) as http:
        assert_error(http.post("/test/admin", headers=bearer(TOKEN)), 403, "--admin-token")
        assert http.get("/models", headers=bearer(TOKEN)).status_code == 200


def test_an_admin_token_alone_closes_the_edge_too():
    with edge_client(edge_admin_token=[ADMIN_TOKEN]) as http:
        assert http.get("/models").status_code == 401
        assert http.get("/models", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_without_tokens_every_route_is_open_as_before():
    with edge_client(admin_route=True) as http:
        for path in PROTECTED + PUBLIC:
            assert http.get(path).status_code == 200, path
        assert http.post("/test/admin").status_code == 200
        assert "securitySchemes" not in http.get("/openapi.json").json()["components"]


def test_tokens_are_compared_in_constant_time_against_every_token(locked, monkeypatch):
    """hmac.compare_digest, once per configured token (3 plain + 1 admin) whichever matches: no early exit."""
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    for token in (TOKEN, OTHER, ADMIN_TOKEN, "wrong"):
        compared.clear()
        locked.get("/models", headers=bearer(token))
        assert sorted(b for _, b in compared) == sorted(t.encode() for t in (TOKEN, OTHER, ADMIN_TOKEN)), token
        assert all(a == token.encode() for a, _ in compared)


def test_tokens_from_options_and_files(tmp_path):
    assert split_tokens(["a,b", "c d", " e "]) == ("a", "b", "c", "d", "e")
    assert split_tokens(None) == () and split_tokens("x") == ("x",)
    path = tmp_path / "tokens"
    path.write_text("# the edge's tokens\n\n  first  \nsecond\n")
    assert read_token_file(path) == ("first", "second")
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_token_file(path)
    for bad in (" padded", "", "naïve", "tab\there"):
        with pytest.raises(ValueError, match="token"):
            EdgeSecurity(tokens=[bad])
    assert "secret" not in repr(EdgeSecurity(tokens=["secret"], admin_tokens=["secret"]))


def test_openapi_declares_the_bearer_scheme_on_the_routes_that_need_it(locked):
    schema = locked.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "cluster edge --token (or --admin-token)",
    }
    paths = schema["paths"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["security"] == [{"bearerAuth": []}] and "401" in infer["responses"]
    assert paths["/models"]["get"]["security"] == [{"bearerAuth": []}]
    assert "403" in paths["/test/admin"]["post"]["responses"]
    for path in PUBLIC:
        assert "security" not in paths[path]["get"], path
    assert locked.get("/docs").status_code == 200  # Swagger UI, which reads the scheme from /openapi.json


# ---- Host -------------------------------------------------------------------------------------------------------


def test_host_must_be_a_loopback_name_by_default():
    with edge_client() as http:
        for host in ("localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]:8000", "[::1]", "LocalHost"):
            assert http.get("/v2/health/live", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "10.0.0.1:8000", ""):
            response = http.get("/v2/health/live", headers={"Host": host})
            assert_error(response, 400, "Host", "--allowed-host")


def test_allowed_hosts_add_names_and_star_allows_any():
    with edge_client(edge_allowed_hosts=["edge.example", "[fd00::5]", "*.svc.example"]) as http:
        for host in ("edge.example:443", "edge.example", "[fd00::5]:8000", "a.svc.example", "localhost"):
            assert http.get("/v2/health/live", headers={"Host": host}).status_code == 200, host
        for host in ("other.example", "svc.example.evil", "xsvc.example"):
            assert http.get("/v2/health/live", headers={"Host": host}).status_code == 400, host
    with edge_client(edge_allowed_hosts=["*"]) as http:
        assert http.get("/v2/health/live", headers={"Host": "anything.example:1"}).status_code == 200


def test_binding_a_network_address_allows_it_and_every_address_warns(caplog):
    assert hosts_for_bind("127.0.0.1", []) == () and hosts_for_bind("::1", ["x"]) == ("x",)
    assert hosts_for_bind("10.1.2.3", ["edge.example"]) == ("edge.example", "10.1.2.3")
    with caplog.at_level(logging.WARNING, logger="edge"):
        assert hosts_for_bind("0.0.0.0", []) == ()
    assert "--allowed-host" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge"):
        assert hosts_for_bind("0.0.0.0", ["edge.example"]) == ("edge.example",)
    assert caplog.text == ""


# ---- what a POST may carry, and where from --------------------------------------------------------------------


def test_infer_accepts_json_octet_stream_and_no_content_type_only():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, headers = binary_echo_body(values)
    with edge_client() as http:
        for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            response = http.post(INFER, content=b'{"inputs": []}', headers={"Content-Type": content_type})
            assert_error(response, 400, "input")  # past the check: the body itself is what the edge refuses
        for content_type in (None, "application/octet-stream", "application/json"):
            sent = dict(headers, **({"Content-Type": content_type} if content_type else {}))
            assert_binary_echo(http.post(INFER, content=body, headers=sent), values)
        for content_type in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8", "multipart/form-data"):
            response = http.post(INFER, content=body, headers=dict(headers, **{"Content-Type": content_type}))
            assert_error(response, 415, "Content-Type", "application/json")
        metrics = http.get("/metrics").text
        assert 'outcome="bad_request"' in metrics


def test_a_post_from_another_origins_page_is_refused():
    with edge_client(edge_cors_origins=["https://app.example"]) as http:
        for origin in ("https://evil.example", "null", "http://127.0.0.1:8001", "http://localhost:8000"):
            response = http.post(INFER, json=echo_body([[1.0]]), headers={"Origin": origin})
            assert_error(response, 403, "not allowed")
        for origin in (EDGE, "https://app.example"):  # the edge's own page, and a CORS origin
            assert http.post(INFER, json=echo_body([[1.0]]), headers={"Origin": origin}).status_code == 200, origin
        assert http.get("/models", headers={"Origin": "https://evil.example"}).status_code == 200  # reads: CORS


def preflight(http, origin: str, headers: str = "authorization, content-type"):
    return http.options(
        INFER,
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers},
    )


def test_preflight_without_cors_origins_answers_but_allows_nothing():
    with edge_client(edge_token=[TOKEN]) as http:  # a preflight carries no token: it is answered anyway
        response = preflight(http, "https://app.example")
        assert response.status_code == 204 and response.content == b""
        assert not [h for h in response.headers if h.startswith("access-control-")], response.headers
        response = http.get("/models", headers=dict(bearer(TOKEN), Origin="https://app.example"))
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_cors_origins_get_starlettes_cors_answers():
    with edge_client(edge_token=[TOKEN], edge_cors_origins=["https://app.example/"]) as http:
        response = preflight(
            http, "https://app.example", "authorization, content-type, inference-header-content-length"
        )
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        allowed = response.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "inference-header-content-length"} <= set(allowed.split(", "))
        assert "POST" in response.headers["access-control-allow-methods"]
        response = http.post(INFER, json=echo_body([[2.0]]), headers=dict(bearer(TOKEN), Origin="https://app.example"))
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "inference-header-content-length" in response.headers["access-control-expose-headers"].lower()
        response = preflight(http, "https://evil.example")  # not a CORS origin: as without any
        assert response.status_code == 204 and "access-control-allow-origin" not in response.headers


# ---- end to end: TLS, tokens, unmodified tritonclient ----------------------------------------------------------


def make_certificate(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (cert.pem, key.pem in `folder`), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def test_cluster_edge_reads_tokens_hosts_origins_and_tls_from_options_and_environment(monkeypatch, tmp_path):
    """`cluster edge`'s options reach run_edge (in-process: run_edge replaced by a recorder)."""
    from typer.testing import CliRunner

    import edge as edge_package
    from cluster.cli import app

    calls = []
    monkeypatch.setattr(edge_package, "run_edge", lambda settings, **kwargs: calls.append(settings))
    env = {"CLUSTER_EDGE_TOKEN": "a,b c", "CLUSTER_EDGE_ADMIN_TOKEN": "root"}
    argv = ["edge", "--token-file", "t.txt", "--allowed-host", "edge.example", "--cors-origin", "https://app.example"]
    argv += ["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"]
    out = CliRunner().invoke(app, argv, env=env)
    assert out.exit_code == 0, out.output
    (settings,) = calls
    assert split_tokens(settings.edge_token) == ("a", "b", "c") and settings.edge_admin_token == ("root",)
    assert settings.edge_token_file == ("t.txt",) and settings.edge_allowed_hosts == ("edge.example",)
    assert settings.edge_cors_origins == ("https://app.example",)
    assert (settings.edge_ssl_certfile, settings.edge_ssl_keyfile) == ("c.pem", "k.pem")


@pytest.mark.cluster
def test_tls_edge_with_tokens_serves_unmodified_tritonclient(cluster, tmp_path):
    """A real `cluster edge` with --ssl-certfile/--ssl-keyfile (a certificate made here) and --token-file, in front
    of a real cluster: health answers without a token, everything else needs it; tritonclient.http with ssl=True,
    trusting the test's certificate (or verifying nothing), and headers={"Authorization": ...} runs inference."""
    import gevent.ssl
    import httpx
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    cert, key = make_certificate(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# edge tokens\n{TOKEN}\n")
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("agent-tls")
    cluster.wait_for_agents(1, model="echo")
    edge = start_edge(
        cluster.addresses.broker_clients,
        tmp_path,
        "--ssl-certfile",
        cert,
        "--ssl-keyfile",
        key,
        "--token-file",
        str(tokens),
        "--admin-token",
        ADMIN_TOKEN,
    )
    url = edge.url
    assert url == f"https://127.0.0.1:{edge.port}", f"a TLS edge reports an https URL, got {url}"
    try:
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=cert), timeout=10) as https:
            assert https.get("/v2/health/live").json() == {"live": True}
            assert https.get("/v2/health/ready").json() == {"ready": True}
            assert https.get("/").status_code == 200
            response = https.get("/models")
            assert_error(response, 401, "Bearer")
            assert response.headers["www-authenticate"] == "Bearer"
            assert "echo" in https.get("/models", headers=bearer(TOKEN)).json()
            assert "echo" in https.get("/models", headers=bearer(ADMIN_TOKEN)).json()
            response = https.post(INFER, json=echo_body([[1.5, 2.5]]), headers=bearer(TOKEN))
            assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.5, 2.5]
        with pytest.raises(httpx.ConnectError):  # really TLS, with a certificate the system does not trust
            httpx.get(url + "/v2/health/live", timeout=10)
        with pytest.raises(httpx.RemoteProtocolError):  # and only TLS
            httpx.get(f"http://127.0.0.1:{edge.port}/v2/health/live", timeout=10)

        values = np.arange(12, dtype=np.float32).reshape(3, 4)
        trusting = {"ssl_options": {"ca_certs": cert}}
        # geventhttpclient's insecure=True skips the host name only: an unverified context skips the chain too
        unverified = {"insecure": True, "ssl_context_factory": gevent.ssl._create_unverified_context}
        for options in (trusting, unverified):
            client = triton.InferenceServerClient(f"127.0.0.1:{edge.port}", ssl=True, **options)
            try:
                assert client.is_server_live() and client.is_server_ready()  # health: no token needed
                with pytest.raises(InferenceServerException) as refused:
                    client.get_model_metadata("echo")
                assert refused.value.status() == "401"
                for binary in (True, False):
                    x = triton.InferInput("x", list(values.shape), "FP32")
                    x.set_data_from_numpy(values, binary_data=binary)
                    wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
                    result = client.infer("echo", [x], outputs=wanted, headers=bearer(TOKEN))
                    np.testing.assert_array_equal(result.as_numpy("y"), values)
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("echo", [x], headers=bearer("not-a-token"))
                assert refused.value.status() == "401" and "not valid" in refused.value.message()
                assert client.get_model_metadata("echo", headers=bearer(TOKEN))["name"] == "echo"
            finally:
                client.close()
    except BaseException:
        print(edge.log())
        raise
    finally:
        edge.stop()
