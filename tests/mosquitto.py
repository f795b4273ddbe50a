"""A real Mosquitto broker for tests, on a free port of 127.0.0.1, configured by the test.

Any test that needs a broker (the MQTT sink, an MQTT source) uses this module::

    from mosquitto import Mosquitto, Subscriber, TestCA, require_mosquitto

    with Mosquitto(tmp_path / "broker", users={"logger": "secret"}, tls=TestCA(tmp_path)) as b:
        b.url          # mqtt://127.0.0.1:<port>  (password file: anonymous clients refused)
        b.tls_url      # mqtts://127.0.0.1:<port>, a certificate signed by the test CA
        b.stop(); b.start()      # same ports, same persistence file: a broker restart
        b.kill(); b.pause(); b.resume()   # SIGKILL, SIGSTOP, SIGCONT
        b.log()        # what the broker logged

    with Subscriber(b.port, "dsmr/#", client_id="tests", persistent=True) as sub:
        sub.wait_for(lambda messages: len(messages) >= 10, 10.0, "ten messages")

``Mosquitto`` writes its own ``mosquitto.conf`` (and password file, ACL file, certificates) into
the directory it is given and starts ``mosquitto -c`` on it; it is stopped (and killed if need
be) when the ``with`` block ends. With ``persistence`` (the default) the broker keeps retained
messages and persistent sessions in that directory across ``stop()``/``start()``, as a real
install does. ``Subscriber`` is an independent MQTT 3.1.1 client (paho-mqtt) that records every
message it receives, in order: QoS 1 with a persistent session, so it gets what was published
while it, or the broker, was away.

A missing ``mosquitto`` binary (Debian package ``mosquitto``) skips a test locally and fails it
under ``CI`` (``require_mosquitto``), as the telegram corpus does.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import getpass
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 10.0


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def require_mosquitto() -> str:
    """The broker's path; missing, it fails the test under CI and skips it elsewhere."""
    found = mosquitto_binary()
    if found is None:
        message = "mosquitto not installed (Debian: apt-get install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def password_line(user: str, password: str) -> str:
    """A password-file line in Mosquitto's salted SHA-512 format (``$6$salt$hash``)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class TestCA:
    """A throw-away certificate authority and a server certificate for 127.0.0.1 / localhost."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost")):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsmr-logger test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.ca_file.write_bytes(ca_cert.public_bytes(pem))
        self.cert_file.write_bytes(cert.public_bytes(pem))
        self.key_file.write_bytes(
            key.private_bytes(
                pem,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


class Mosquitto:
    """One ``mosquitto`` process with a configuration this object writes; see the module doc."""

    def __init__(
        self,
        directory: Path,
        *,
        users: Mapping[str, str] | None = None,
        acl: Mapping[str, Sequence[str]] | None = None,
        tls: TestCA | None = None,
        message_size_limit: int | None = None,
        max_packet_size: int | None = None,
        persistence: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        """``users``: name → password (anonymous clients are then refused); ``acl``: name →
        topic patterns it may write (and read); ``tls``: also a TLS listener."""
        self.binary = require_mosquitto()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        lines = [
            f"user {getpass.getuser()}",  # as root it would switch to "mosquitto": keep ours
            f"listener {self.port} 127.0.0.1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        if message_size_limit is not None:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        if users is not None:
            passwords = directory / "passwords"
            passwords.write_text("".join(password_line(u, p) + "\n" for u, p in users.items()))
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            rules = directory / "acl"
            rules.write_text(
                "".join(
                    f"user {name}\n" + "".join(f"topic readwrite {t}\n" for t in topics)
                    for name, topics in acl.items()
                )
            )
            lines.append(f"acl_file {rules}")
        lines += list(extra)
        if tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {tls.ca_file}",
                f"certfile {tls.cert_file}",
                f"keyfile {tls.key_file}",
            ]
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_file = directory / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "no TLS listener: pass tls=TestCA(...)"
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def start(self) -> Mosquitto:
        """Start (again, on the same ports); returns once the plain listener accepts."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mosquitto not listening after {START_TIMEOUT} s:\n{self.log()}"
                )
            time.sleep(0.02)
        return self

    def _accepts(self) -> bool:
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        for port in ports:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
        return True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: a clean stop (the persistence file is written), as ``systemctl stop``."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)  # in case it was paused
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung broker or dead link)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """An independent MQTT client (paho-mqtt, MQTT 3.1.1) recording what it receives, in order.

    ``persistent``: a session the broker keeps (clean session off, QoS 1), so messages published
    while this subscriber or the broker was away are delivered when both are back. It reconnects
    by itself after a broker restart.
    """

    def __init__(
        self,
        port: int,
        *topics: str,
        client_id: str = "test-subscriber",
        persistent: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: TestCA | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topics = topics or ("#",)
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls.ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(
                Received(message.topic, bytes(message.payload), bool(message.retain), message.qos)
            )

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(START_TIMEOUT):
            raise RuntimeError("the test subscriber got no SUBACK")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def received(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.received(topic)]

    def wait_for(
        self, predicate: Callable[[list[Received]], Any], timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.received()):
            if time.monotonic() > deadline:
                counts: dict[str, int] = {}
                for message in self.received():
                    counts[message.topic] = counts.get(message.topic, 0) + 1
                pytest.fail(f"timed out after {timeout} s waiting for {what}; got {counts}")
            time.sleep(0.02)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
