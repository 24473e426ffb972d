"""TLS for the gRPC ports: a server's certificate and key, a client's trusted CA.

    tls = ServerTls.from_options("cert.pem", "key.pem")    # None when neither is given
    port = server.add_secure_port(address, tls.credentials())
    channel = grpc.secure_channel(target, channel_credentials("ca.pem"))

PEM files only. A client trusts the CA (or the self-signed certificate) it is given; the
certificate must name the host the client dials (a subjectAltName such as IP:127.0.0.1 or
DNS:localhost).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import grpc

Pem = str | os.PathLike | bytes     # a PEM file's path, or its contents


def read_pem(source: Pem, field: str = "tls_ca") -> bytes:
    """PEM bytes from a path or from the bytes themselves; ValueError naming `field` if it is
    missing or holds no PEM block."""
    if isinstance(source, bytes):
        data = source
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise ValueError(f"{field}: no such file {str(path)[:200]!r}")
        data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{field}: not a PEM file (no '-----BEGIN ' line)")
    return data


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and private key (PEM files)."""
    cert_file: str
    key_file: str

    @classmethod
    def from_options(cls, cert: str | None, key: str | None) -> "ServerTls | None":
        """--tls-cert and --tls-key: both (TLS), or neither (None: plaintext)."""
        if not cert and not key:
            return None
        if not cert or not key:
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        tls = cls(str(cert), str(key))
        tls.credentials()                 # fail now on a missing or malformed file
        return tls

    def certificate(self) -> bytes:
        return read_pem(self.cert_file, "tls_cert")

    def credentials(self) -> grpc.ServerCredentials:
        cert = self.certificate()
        return grpc.ssl_server_credentials([(read_pem(self.key_file, "tls_key"), cert)])

    def self_trust(self) -> grpc.ChannelCredentials:
        """Credentials of a client that trusts this certificate itself (the server's own HTTP
        gateway dialing its gRPC port: a self-signed certificate, or one whose file carries its
        whole chain up to the root)."""
        return grpc.ssl_channel_credentials(root_certificates=self.certificate())


def channel_credentials(ca: Pem | None) -> grpc.ChannelCredentials | None:
    """TLS credentials of a client trusting `ca` (None: plaintext, no credentials)."""
    if ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca))


def scheme(tls: object) -> str:
    """"https" with TLS, else "http" (for printed addresses)."""
    return "https" if tls else "http"


__all__ = ["Pem", "ServerTls", "channel_credentials", "read_pem", "scheme"]
