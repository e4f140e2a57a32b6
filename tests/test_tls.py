"""perkey+rediss://: a real TLS connection, with certificates the test makes."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import states
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from celery_perkey_backend import AccessDeniedError

from .netproxy import Proxy


def _cert(
    subject: str, issuer_key: Any, issuer: x509.Name | None, ca: bool
) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return key, builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _cert("perkey test CA", None, None, ca=True)
    key, cert = _cert("127.0.0.1", ca_key, ca.subject, ca=False)
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def tls_proxy(server: Any, pki: dict[str, Path]) -> Iterator[Proxy]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["cert"], pki["key"])
    proxy = Proxy(server.port, tls=context)
    yield proxy
    proxy.close()


def test_rediss_with_verified_certificate(
    make_app: Any, tls_proxy: Proxy, pki: dict[str, Path]
) -> None:
    url = (
        f"perkey+rediss://127.0.0.1:{tls_proxy.port}/0"
        f"?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={pki['ca']}"
    )
    app = make_app(backend=url)
    app.backend.store_result("t1", "over tls", states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == "over tls"


def test_rediss_verifies_by_default(make_app: Any, tls_proxy: Proxy) -> None:
    # With the default retry policy: a certificate that fails verification is never
    # retried as if the server were down.
    app = make_app(backend=f"perkey+rediss://127.0.0.1:{tls_proxy.port}/0")
    started = time.monotonic()
    with pytest.raises(AccessDeniedError, match="certificate verify failed"):
        app.backend.store_result("t1", 1, states.SUCCESS)
    assert time.monotonic() - started < 3


def test_redis_backend_use_ssl_setting(
    make_app: Any, tls_proxy: Proxy, pki: dict[str, Path]
) -> None:
    app = make_app(
        backend=f"perkey://127.0.0.1:{tls_proxy.port}/0",
        redis_backend_use_ssl={"ssl_cert_reqs": "CERT_REQUIRED", "ssl_ca_certs": str(pki["ca"])},
    )
    app.backend.store_result("t1", "setting", states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == "setting"
