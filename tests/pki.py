"""A throwaway certificate authority for tests and benchmarks (`cryptography`): never use it for real.

    pki = throwaway_pki("127.0.0.2")   # {"ca", "cert", "key", "client_cert", "client_key", "rogue_cert", "rogue_key"}
"""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca=False, ips=(), client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ips:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                            critical=False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(issuer_key or key, hashes.SHA256())
    return cert, cert.public_bytes(serialization.Encoding.PEM).decode()


def throwaway_pki(ip: str) -> dict:
    """PEM text: a CA, a shard certificate for `ip`, a client certificate, and a rogue client from another CA."""
    ca_key = _key()
    ca, ca_pem = _cert("engram-mem test CA", ca_key, ca=True)
    srv_key = _key()
    _, srv_pem = _cert("shard", srv_key, ca, ca_key, ips=[ip])
    cli_key = _key()
    _, cli_pem = _cert("trainer", cli_key, ca, ca_key, client=True)
    other_key = _key()
    other_ca, _ = _cert("someone else's CA", other_key, ca=True)
    rogue_key = _key()
    _, rogue_pem = _cert("rogue", rogue_key, other_ca, other_key, client=True)
    return {"ca": ca_pem, "cert": srv_pem, "key": _pem(srv_key), "client_cert": cli_pem, "client_key": _pem(cli_key),
            "rogue_cert": rogue_pem, "rogue_key": _pem(rogue_key)}


