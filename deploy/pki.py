#!/usr/bin/env python3
"""Keys and certificates for a secure fedamlp federation (Flower 1.41 SuperLink + SuperNodes).

Three subcommands, each writing into one folder (``--dir``, default ``deploy/pki``, which git
ignores and ``deploy/compose.yaml`` mounts from)::

    python deploy/pki.py ca                                   # ca.crt, ca.key
    python deploy/pki.py server-cert --host fl.example.org --host 10.0.0.5
                                                              # server.crt, server.key (signed by ca.key)
    python deploy/pki.py site-key st-mary                     # sites/st-mary.key, sites/st-mary.pub

- ``ca``: a self-signed certificate authority (EC P-384). ``ca.crt`` goes to every machine
  that talks to the SuperLink (sites, operator); ``ca.key`` never leaves the machine that made it.
- ``server-cert``: the SuperLink's TLS certificate, with a subjectAltName for every ``--host``
  (DNS name or IP address). ``127.0.0.1`` and ``localhost`` are always added: the SuperLink's
  own SuperExec connects to it on the loopback address over TLS (``--host 0.0.0.0`` becomes
  ``127.0.0.1`` for it), and would fail without them.
- ``site-key NAME``: a hospital's node-authentication key pair, EC P-384, the OpenSSH formats
  that ``flower-supernode --auth-supernode-private-key`` (private) and ``flwr supernode register``
  (public) read. Run it on the hospital's own machine; only the ``.pub`` file travels.

Private keys are written with mode 0600 and an existing file is never overwritten unless
``--force`` is given. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SITES = "sites"
ALWAYS_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's own SuperExec connects here
DEFAULT_DIR = Path(__file__).resolve().parent / "pki"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PKIError(Exception):
    """A problem the user can fix; the message says what and where."""


# ---- files ---------------------------------------------------------------------------------------


def _check_free(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise PKIError(f"{', '.join(existing)} already exist(s); refusing to overwrite (use --force to replace)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` atomically; private files are created with mode 0600 (never wider, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed the mode of a public file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PKIError(f"{path} not found: make the CA first (python deploy/pki.py ca --dir {folder})")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as e:
        raise PKIError(f"cannot read the CA in {folder}: {e}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise PKIError(f"{key_path} is not the key of {cert_path}")
    return cert, key


# ---- certificates --------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(folder: Path, name: str, days: int, force: bool) -> list[Path]:
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    _check_free([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedamlp federation"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return [cert_path, key_path]


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(
        r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", host
    ):
        raise PKIError(f"--host {host!r} is neither an IP address nor a DNS name (no scheme, no port)")
    return x509.DNSName(host.lower())


def make_server_cert(folder: Path, hosts: list[str], days: int, force: bool) -> list[Path]:
    cert_path, key_path = folder / SERVER_CERT, folder / SERVER_KEY
    ca_cert, ca_key = _load_ca(folder)
    names = list(dict.fromkeys([*hosts, *ALWAYS_HOSTS]))  # ordered, without duplicates
    sans = [_san(h) for h in names]
    _check_free([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedamlp federation"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return [cert_path, key_path]


# ---- node authentication -------------------------------------------------------------------------


def make_site_key(folder: Path, name: str, force: bool) -> list[Path]:
    if not SITE_NAME.match(name):
        raise PKIError(
            f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    key_path, pub_path = folder / SITES / f"{name}.key", folder / SITES / f"{name}.pub"
    _check_free([key_path, pub_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(key_path, private, private=True)
    _write(pub_path, public + f" fedamlp-{name}\n".encode(), private=False)
    return [key_path, pub_path]


# ---- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"folder for the files (default: {DEFAULT_DIR})")
    common.add_argument("--force", action="store_true", help="replace existing files (private keys included)")
    p = argparse.ArgumentParser(prog="python deploy/pki.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", parents=[common], help="make the certificate authority (ca.crt, ca.key)")
    ca.add_argument("--name", default="fedamlp federation CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    srv = sub.add_parser(
        "server-cert",
        parents=[common],
        help="make the SuperLink's TLS certificate (server.crt, server.key), signed by the CA in --dir",
    )
    srv.add_argument(
        "--host",
        action="append",
        default=[],
        required=True,
        help="DNS name or IP address the sites and the operator use to reach the SuperLink "
        "(repeat; 127.0.0.1 and localhost are always added)",
    )
    srv.add_argument("--days", type=int, default=825, help="validity in days (default 825, capped by the CA's)")
    site = sub.add_parser(
        "site-key",
        parents=[common],
        help="make a site's node-authentication key pair (sites/NAME.key, sites/NAME.pub), EC P-384, OpenSSH format",
    )
    site.add_argument("name", help="the site's name (file names only; Flower identifies nodes by key)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "days", 1) < 1:
            raise PKIError("--days must be at least 1")
        folder = args.dir
        if args.command == "ca":
            written = make_ca(folder, args.name, args.days, args.force)
        elif args.command == "server-cert":
            written = make_server_cert(folder, args.host, args.days, args.force)
        else:
            written = make_site_key(folder, args.name, args.force)
    except (PKIError, OSError) as e:
        print(f"pki.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
