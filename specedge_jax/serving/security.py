"""Transport security and client authentication between the verifier and its edge drafters.

What this module owns: the two security configs (`ServerSecurity` for the verifier,
`ClientSecurity` for a drafter or any other client) and their validation; the TLS credentials
built from them (`server_credentials`, `open_channel`); per-client bearer tokens (`Authenticator`
and its server interceptor); and a throw-away test PKI (`make_test_pki`, `make_tokens`) that the
tests and the one-machine cluster (`local.py`) generate into a folder.

What it never touches: the Verifier's handlers, sessions and engines. Authentication happens
before a handler runs (the interceptor aborts unauthenticated calls with UNAUTHENTICATED); the
servicer only learns who is calling, through the `identify` callable the verifier hands it
(`Authenticator.client_of`). The standard health service (`/grpc.health.v1.Health/`) stays
open without a token so that readiness probes work; it serves only SERVING / NOT_SERVING.

Policy: plaintext is refused unless `allow_insecure` is set (the error names the flag). TLS needs
a certificate and its key; `client_ca_file` on the server makes it mutual TLS (a client without a
certificate signed by that CA fails the handshake). A token never appears in an error, a log or
a repr.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import ipaddress
import json
import os
import re
import secrets
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc

# The flag each field is set by (launch/verifier.py, launch/drafter.py), so errors name both.
SERVER_FLAGS = {"cert_file": "--tls_cert", "key_file": "--tls_key",
                "client_ca_file": "--tls_client_ca", "tokens_file": "--auth_tokens",
                "allow_insecure": "--allow_insecure"}
CLIENT_FLAGS = {"ca_file": "--tls_ca", "cert_file": "--tls_client_cert",
                "key_file": "--tls_client_key", "token": "--auth_token_file",
                "allow_insecure": "--allow_insecure"}

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_AUTHORIZATION = "authorization"
# What a token may hold: it travels in an HTTP/2 header value (printable ASCII, no spaces).
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

_Pairs = Iterable[tuple[str, str | bytes]]


class SecurityConfigError(ValueError):
  """A security setting is inconsistent, or a file it names is missing or malformed."""


def _name(cls: str, flags: Mapping[str, str], field: str) -> str:
  return f"{cls}.{field} ({flags[field]})"


def _read(path: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise SecurityConfigError(f"{what}: no such file {path!r}") from None
  except OSError as e:
    raise SecurityConfigError(f"{what}: cannot read {path!r}: {e.strerror or e}") from None
  if not data.strip():
    raise SecurityConfigError(f"{what}: {path!r} is empty")
  return data


def _load_certs(path: str, what: str) -> list[Any]:
  from cryptography import x509  # pylint: disable=g-import-not-at-top

  data = _read(path, what)
  try:
    return x509.load_pem_x509_certificates(data)
  except ValueError:
    raise SecurityConfigError(f"{what}: {path!r} holds no PEM certificate") from None


def _load_key(path: str, what: str) -> Any:
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top

  data = _read(path, what)
  try:
    return serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError) as e:
    # TypeError: the key is encrypted. Never put the file's content into the message.
    raise SecurityConfigError(f"{what}: {path!r} is not an unencrypted PEM private key "
                              f"({type(e).__name__})") from None


def _check_pair(cert_path: str, key_path: str, cert_what: str, key_what: str) -> None:
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top

  cert = _load_certs(cert_path, cert_what)[0]
  key = _load_key(key_path, key_what)
  raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
  if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
    raise SecurityConfigError(f"{key_what}: {key_path!r} is not the key of the certificate "
                              f"{cert_path!r} ({cert_what})")


def _check_token(token: str, what: str) -> None:
  if not token:
    raise SecurityConfigError(f"{what}: the token is empty")
  if not _TOKEN_CHARS.match(token):
    raise SecurityConfigError(f"{what}: a token must be printable ASCII without spaces")


def read_tokens(path: str, what: str = "tokens file") -> dict[str, str]:
  """Reads a tokens file: a JSON object {"client name": "token", ...}. Validates every entry."""
  data = _read(path, what)

  def no_duplicate_names(pairs):
    seen: dict[str, Any] = {}
    for key, value in pairs:
      if key in seen:
        raise SecurityConfigError(f"{what}: {path!r} names client {key!r} twice")
      seen[key] = value
    return seen

  try:
    tokens = json.loads(data, object_pairs_hook=no_duplicate_names)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SecurityConfigError(f"{what}: {path!r} is not valid JSON ({e})") from None
  if not isinstance(tokens, dict) or not tokens:
    raise SecurityConfigError(f"{what}: {path!r} must hold a non-empty JSON object "
                              '{"client name": "token", ...}')
  owners: dict[str, str] = {}
  for name, token in tokens.items():
    if not name:
      raise SecurityConfigError(f"{what}: {path!r} has an empty client name")
    if not isinstance(token, str):
      raise SecurityConfigError(f"{what}: {path!r}: the token of client {name!r} is not a string")
    _check_token(token, f"{what} {path!r}, client {name!r}")
    if token in owners:
      raise SecurityConfigError(f"{what}: {path!r}: clients {owners[token]!r} and {name!r} have "
                                "the same token (each client needs its own)")
    owners[token] = name
  return dict(tokens)


def read_token_file(path: str, what: str = "token file (--auth_token_file)") -> str:
  """Reads one client's bearer token from a file (surrounding whitespace is dropped)."""
  try:
    token = _read(path, what).decode("ascii").strip()
  except UnicodeDecodeError:
    raise SecurityConfigError(f"{what}: {path!r} is not ASCII text") from None
  _check_token(token, f"{what} {path!r}")
  return token


def read_api_keys_file(path: str, what: str = "API keys file (--http_api_keys_file)"
                       ) -> frozenset[str]:
  """The HTTP API's keys: one per line; blank lines and lines starting with '#' are skipped."""
  try:
    text = _read(path, what).decode("ascii")
  except UnicodeDecodeError:
    raise SecurityConfigError(f"{what}: {path!r} is not ASCII text") from None
  keys = [line.strip() for line in text.splitlines()]
  keys = [key for key in keys if key and not key.startswith("#")]
  if not keys:
    raise SecurityConfigError(f"{what}: {path!r} holds no key")
  for number, key in enumerate(keys, 1):
    _check_token(key, f"{what} {path!r}, key {number}")
  return frozenset(keys)


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
  """The verifier's transport security. Every named file is read and checked on construction.

  cert_file, key_file: the TLS server certificate (chain) and its key, PEM; both empty = no TLS.
  client_ca_file: require client certificates signed by this CA (mutual TLS); needs TLS.
  tokens_file: per-client bearer tokens, a JSON object {"client name": "token", ...}; every RPC
    but the health service must carry `authorization: Bearer <token>`.
  allow_insecure: plaintext is allowed only when this is set (`server_credentials` refuses it
    otherwise).
  """

  cert_file: str = ""
  key_file: str = ""
  client_ca_file: str = ""
  tokens_file: str = ""
  allow_insecure: bool = False

  def __post_init__(self):
    field = lambda f: _name("ServerSecurity", SERVER_FLAGS, f)
    if bool(self.cert_file) != bool(self.key_file):
      given, missing = ("cert_file", "key_file") if self.cert_file else ("key_file", "cert_file")
      raise SecurityConfigError(f"{field(given)} is set but {field(missing)} is not: TLS needs "
                                "both the certificate and its key")
    if self.client_ca_file and not self.tls:
      raise SecurityConfigError(f"{field('client_ca_file')} needs TLS: set {field('cert_file')} "
                                f"and {field('key_file')} too")
    if self.tls:
      _check_pair(self.cert_file, self.key_file, field("cert_file"), field("key_file"))
    if self.client_ca_file:
      _load_certs(self.client_ca_file, field("client_ca_file"))
    if self.tokens_file:
      read_tokens(self.tokens_file, field("tokens_file"))

  @property
  def tls(self) -> bool:
    return bool(self.cert_file)

  @property
  def mutual_tls(self) -> bool:
    return bool(self.client_ca_file)

  def require_allowed(self) -> None:
    """Raises unless this config may serve: TLS, or plaintext with allow_insecure."""
    if not self.tls and not self.allow_insecure:
      raise SecurityConfigError(
          "refusing to serve plaintext: give a TLS certificate and key (ServerSecurity.cert_file "
          "/ key_file, --tls_cert / --tls_key), or set ServerSecurity.allow_insecure "
          "(--allow_insecure) to allow an unencrypted port")

  def describe(self) -> str:
    """For a log line: what the port requires (never a path's content or a token)."""
    transport = "mutual TLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"
    return transport + (", bearer tokens" if self.tokens_file else ", no authentication")

  def tokens(self) -> dict[str, str]:
    """client name -> token ({} without a tokens file)."""
    return read_tokens(self.tokens_file, _name("ServerSecurity", SERVER_FLAGS, "tokens_file")) \
        if self.tokens_file else {}


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
  """A client's transport security. Every named file is read and checked on construction.

  ca_file: the trust root for the server's certificate, PEM; set = TLS.
  cert_file, key_file: this client's certificate and key, for a mutual-TLS server; need ca_file.
  token: the bearer token sent with every call (never shown in repr or errors).
  allow_insecure: a plaintext channel (no ca_file) is allowed only when this is set.
  server_name_override: the host name to check the server's certificate against, instead of the
    address's host (for tests, or a server reached by an address its certificate does not name).
  """

  ca_file: str = ""
  cert_file: str = ""
  key_file: str = ""
  token: str = dataclasses.field(default="", repr=False)
  allow_insecure: bool = False
  server_name_override: str = ""

  def __post_init__(self):
    field = lambda f: _name("ClientSecurity", CLIENT_FLAGS, f)
    if bool(self.cert_file) != bool(self.key_file):
      given, missing = ("cert_file", "key_file") if self.cert_file else ("key_file", "cert_file")
      raise SecurityConfigError(f"{field(given)} is set but {field(missing)} is not: a client "
                                "certificate needs its key")
    if self.cert_file and not self.ca_file:
      raise SecurityConfigError(f"{field('cert_file')} needs TLS: set {field('ca_file')} too")
    if self.server_name_override and not self.ca_file:
      raise SecurityConfigError("ClientSecurity.server_name_override needs TLS: set "
                                f"{field('ca_file')} too")
    if self.ca_file:
      _load_certs(self.ca_file, field("ca_file"))
    if self.cert_file:
      _check_pair(self.cert_file, self.key_file, field("cert_file"), field("key_file"))
    if self.token:
      _check_token(self.token, field("token"))

  @property
  def tls(self) -> bool:
    return bool(self.ca_file)

  def require_allowed(self) -> None:
    """Raises unless this config may connect: TLS, or plaintext with allow_insecure."""
    if not self.tls and not self.allow_insecure:
      raise SecurityConfigError(
          "refusing to open a plaintext channel: give the CA that signed the server's "
          "certificate (ClientSecurity.ca_file, --tls_ca), or set ClientSecurity.allow_insecure "
          "(--allow_insecure)")


# -- authentication -------------------------------------------------------------------------------


def _bearer_token(metadata: _Pairs | None) -> str | None:
  """The token of the first `authorization: Bearer <token>` entry; None if there is none."""
  for key, value in metadata or ():
    if key.lower() != _AUTHORIZATION:
      continue
    if isinstance(value, bytes):
      value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
      return token.strip()
  return None


class Authenticator:
  """Maps a call's bearer token to a client name. Tokens are compared in constant time."""

  def __init__(self, tokens: Mapping[str, str]):
    if not tokens:
      raise SecurityConfigError("Authenticator: no tokens")
    for name, token in tokens.items():
      _check_token(token, f"Authenticator, client {name!r}")
    if len(set(tokens.values())) != len(tokens):
      raise SecurityConfigError("Authenticator: two clients have the same token")
    self._tokens = [(name, token.encode("ascii")) for name, token in tokens.items()]

  @classmethod
  def from_security(cls, security: ServerSecurity) -> Authenticator | None:
    """The authenticator of a config's tokens file; None when it has none."""
    tokens = security.tokens()
    return cls(tokens) if tokens else None

  def __repr__(self) -> str:
    return f"Authenticator({len(self._tokens)} clients)"

  @property
  def client_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self._tokens)

  def _check(self, metadata: _Pairs | None) -> tuple[str | None, str]:
    """(client name, "") or (None, why the call is refused)."""
    token = _bearer_token(metadata)
    if token is None:
      return None, "missing bearer token (send 'authorization: Bearer <token>' metadata)"
    try:
      given = token.encode("ascii")
    except UnicodeEncodeError:
      return None, "unknown bearer token"
    found = None
    for name, known in self._tokens:  # no early exit: the time does not depend on which matched
      if hmac.compare_digest(given, known):
        found = name
    return (found, "") if found is not None else (None, "unknown bearer token")

  def client_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The client name for `authorization: Bearer <token>` metadata; None if absent or unknown."""
    return self._check(metadata)[0]

  def interceptor(self) -> grpc.aio.ServerInterceptor:
    """A server interceptor: every method but the health service needs a known bearer token."""
    return _AuthInterceptor(self)


def _aborting_handler(handler: grpc.RpcMethodHandler | None,
                      details: str) -> grpc.RpcMethodHandler:
  """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED before anything is
  read or run. The request is left undeserialized (raw bytes): nothing of it is parsed."""

  async def abort(_request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

  if handler is not None and handler.request_streaming and handler.response_streaming:
    return grpc.stream_stream_rpc_method_handler(abort)
  if handler is not None and handler.request_streaming:
    return grpc.stream_unary_rpc_method_handler(abort)
  if handler is not None and handler.response_streaming:
    return grpc.unary_stream_rpc_method_handler(abort)
  return grpc.unary_unary_rpc_method_handler(abort)


class _AuthInterceptor(grpc.aio.ServerInterceptor):

  def __init__(self, authenticator: Authenticator):
    self._authenticator = authenticator

  async def intercept_service(
      self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
      handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
    method = handler_call_details.method
    if method.startswith(HEALTH_METHOD_PREFIX):
      return await continuation(handler_call_details)
    metadata = handler_call_details.invocation_metadata
    client, refusal = self._authenticator._check(metadata)  # pylint: disable=protected-access
    handler = await continuation(handler_call_details)
    if client is None:
      # Unknown methods are refused too: an unauthenticated caller learns nothing of the API.
      return _aborting_handler(handler, refusal)
    return handler


# -- credentials and channels ---------------------------------------------------------------------


def server_credentials(security: ServerSecurity) -> grpc.ServerCredentials | None:
  """The TLS credentials of a config; None for plaintext (only with allow_insecure)."""
  security.require_allowed()
  if not security.tls:
    return None
  field = lambda f: _name("ServerSecurity", SERVER_FLAGS, f)
  pair = (_read(security.key_file, field("key_file")),
          _read(security.cert_file, field("cert_file")))
  if security.mutual_tls:
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(security.client_ca_file, field("client_ca_file")),
        require_client_auth=True)
  return grpc.ssl_server_credentials([pair])


class _TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                        grpc.aio.StreamUnaryClientInterceptor,
                        grpc.aio.StreamStreamClientInterceptor):
  """Adds `authorization: Bearer <token>` to every call of a plaintext channel (gRPC refuses
  call credentials there)."""

  def __init__(self, token: str):
    self._value = f"Bearer {token}"

  def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()))
    metadata.add(_AUTHORIZATION, self._value)
    return details._replace(metadata=metadata)

  async def intercept_unary_unary(self, continuation, client_call_details, request):
    return await continuation(self._details(client_call_details), request)

  async def intercept_unary_stream(self, continuation, client_call_details, request):
    return await continuation(self._details(client_call_details), request)

  async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
    return await continuation(self._details(client_call_details), request_iterator)

  async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
    return await continuation(self._details(client_call_details), request_iterator)


def open_channel(address: str, security: ClientSecurity,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
  """A grpc.aio channel to `address` under `security` (TLS, client certificate, bearer token).

  Plaintext is refused unless `security.allow_insecure`. The channel connects lazily: a bad
  certificate shows as UNAVAILABLE on the first call.
  """
  security.require_allowed()
  options = list(options)
  if not security.tls:
    interceptors = [_TokenInterceptor(security.token)] if security.token else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
  field = lambda f: _name("ClientSecurity", CLIENT_FLAGS, f)
  root = _read(security.ca_file, field("ca_file"))
  key = _read(security.key_file, field("key_file")) if security.key_file else None
  chain = _read(security.cert_file, field("cert_file")) if security.cert_file else None
  credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                             certificate_chain=chain)
  if security.token:
    credentials = grpc.composite_channel_credentials(
        credentials, grpc.access_token_call_credentials(security.token))
  if security.server_name_override:
    options.append(("grpc.ssl_target_name_override", security.server_name_override))
  return grpc.aio.secure_channel(address, credentials, options=options)


# -- a test PKI -----------------------------------------------------------------------------------


def _write_private(path: str, data: bytes) -> None:
  """Writes a file only its owner can read (also when it already existed)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  try:
    os.fchmod(fd, 0o600)
    os.write(fd, data)
  finally:
    os.close(fd)


def make_test_pki(directory: str, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                  valid_days: int = 30) -> dict[str, str]:
  """A throw-away PKI for tests and one-machine runs, written into `directory`.

  A self-signed CA (its key is not kept), a server certificate for `hosts` (names as DNS names,
  addresses as IP subject alternative names) and a client certificate, all EC P-256. Keys are
  written readable by their owner only. Returns the paths: ca_cert, server_cert, server_key,
  client_cert, client_key.
  """
  # pylint: disable=g-import-not-at-top (cryptography loads only where certificates are made)
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
  # pylint: enable=g-import-not-at-top

  if not hosts:
    raise ValueError("make_test_pki: give at least one host for the server certificate")
  os.makedirs(directory, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=valid_days)
  name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = name(f"specedge-jax test CA {secrets.token_hex(4)}")
  ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
             .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                                          encipher_only=False, decipher_only=False),
                            critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                            critical=False)
             .sign(ca_key, hashes.SHA256()))

  def leaf(common_name: str, usage, san: list[x509.GeneralName] | None):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if san:
      builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key

  san: list[x509.GeneralName] = []
  for host in hosts:
    try:
      san.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
      san.append(x509.DNSName(host))
  server_cert, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, san)
  client_cert, client_key = leaf("specedge-jax test client", ExtendedKeyUsageOID.CLIENT_AUTH,
                                 None)

  pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)
  key_pem = lambda key: key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
  paths = {k: os.path.join(directory, f) for k, f in (
      ("ca_cert", "ca.pem"), ("server_cert", "server.pem"), ("server_key", "server.key"),
      ("client_cert", "client.pem"), ("client_key", "client.key"))}
  for key_name, data in (("ca_cert", pem(ca_cert)), ("server_cert", pem(server_cert)),
                         ("client_cert", pem(client_cert))):
    with open(paths[key_name], "wb") as f:
      f.write(data)
  _write_private(paths["server_key"], key_pem(server_key))
  _write_private(paths["client_key"], key_pem(client_key))
  return paths


def token_file(directory: str, client_name: str) -> str:
  """Where `make_tokens` wrote one client's token."""
  return os.path.join(directory, f"{client_name}.token")


def make_tokens(directory: str, client_names: Sequence[str]) -> str:
  """Writes a tokens file (`tokens.json`, {"name": token}) with a fresh `secrets.token_urlsafe`
  token per client, and each client's token alone into `<name>.token` (`token_file`), for
  `--auth_token_file`. All owner-readable only. Returns the tokens file's path."""
  if not client_names:
    raise ValueError("make_tokens: no client names")
  if len(set(client_names)) != len(client_names):
    raise ValueError(f"make_tokens: duplicate client names in {list(client_names)}")
  bad = [n for n in client_names if not _FILE_NAME.match(n)]
  if bad:
    raise ValueError(f"make_tokens: client names {bad} are not plain file names "
                     "(letters, digits, '_', '.', '-')")
  os.makedirs(directory, exist_ok=True)
  tokens = {name: secrets.token_urlsafe(32) for name in client_names}
  path = os.path.join(directory, "tokens.json")
  _write_private(path, (json.dumps(tokens, indent=2) + "\n").encode())
  for name, token in tokens.items():
    _write_private(token_file(directory, name), (token + "\n").encode())
  return path
