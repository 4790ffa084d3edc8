"""How the service reaches Redis safely: password (AUTH), an ACL user with least rights, TLS, masked URLs.

:class:`RedisSettings` is the one typed place for a connection: the URL (``redis://`` or ``rediss://``,
``[user:password@]`` optional), a password given apart from the URL (``--redis-password-file`` or
``$REFSTREAM_REDIS_PASSWORD``, so it never sits on a command line) and the TLS files (``--redis-ca``,
``--redis-cert``, ``--redis-key``). Every service verb builds one from its arguments
(:meth:`RedisSettings.from_args`) and :func:`refstream.service.queue.connect` turns it into a client; the
settings travel to the Ray actors as they are (their ``repr`` masks the password).

:func:`mask_url` replaces a URL's password with ``***`` (the user is kept): whatever prints, logs or
reports a Redis URL uses it. :func:`check_connection` pings once and turns the failures a user can fix
(wrong password, TLS handshake, unreachable server) into :class:`RefStreamError` subclasses (exit 2) whose
messages name the user, the masked URL and the files, never the password.

:data:`ACL_RULE` is the least-rights ACL rule of the service's Redis user (commands and key pattern the
queue, workers, heartbeats and metrics use; ``tests/test_service_security.py`` runs the service flow as a
user with only this rule): ``ACL SETUSER refstream on >PASSWORD`` followed by the rule.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from refstream.errors import ConfigError, RefStreamError

PASSWORD_ENV = "REFSTREAM_REDIS_PASSWORD"

# Every command the service sends (queue.py, worker.py, streaming.py, serve.py, metrics.py), nothing else.
ACL_COMMANDS = (
    "ping", "select", "multi", "exec", "discard",
    "get", "set", "del", "exists", "expire", "scan",
    "hget", "hset", "hsetnx", "hgetall", "hincrby", "hincrbyfloat",
    "xadd", "xack", "xautoclaim", "xclaim", "xgroup|create", "xinfo|groups", "xlen", "xpending", "xrange",
    "xreadgroup", "xtrim", "xdel",
)


def acl_rule(prefix: str = "refstream") -> str:
    """The least-rights ACL rule for a service user on queue ``prefix`` (keys ``{prefix}:*`` only, no pub/sub
    channels, only the commands in :data:`ACL_COMMANDS`)."""
    return f"resetkeys ~{prefix}:* resetchannels -@all " + " ".join(f"+{c}" for c in ACL_COMMANDS)


ACL_RULE = acl_rule()


class RedisAuthError(RefStreamError):
    """Redis refused the user / password (or the user lacks a command the service needs)."""


class RedisTLSError(RefStreamError):
    """The TLS handshake with Redis failed (CA, client certificate or key)."""


class RedisUnavailableError(RefStreamError):
    """Redis does not answer at the URL."""


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user is kept); URLs without a password unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. a malformed port: mask everything between :// and @
        password = "?"
        parts = None
    if password is None:
        return url
    if parts is None:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(frozen=True)
class RedisSettings:
    """Where and how to reach Redis.

    Args:
        url: ``redis[s]://[user[:password]@]host:port/db``.
        password: the password when it is not in the URL (from a file or the environment).
        ca: CA bundle the server's certificate must chain to (``rediss://``; ``ssl_cert_reqs=required``).
        cert, key: the client certificate and its key (servers with ``--tls-auth-clients yes``).

    Raises:
        ConfigError: a TLS file is missing, TLS files with a ``redis://`` URL, or a password given twice.
    """

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--redis-url must start with redis://, rediss:// or unix://, got {self.masked}")
        tls_files = {"--redis-ca": self.ca, "--redis-cert": self.cert, "--redis-key": self.key}
        given = [flag for flag, path in tls_files.items() if path]
        if given and scheme != "rediss":
            raise ConfigError(f"{', '.join(given)} need a TLS URL: use rediss:// instead of {self.masked}")
        for flag, path in tls_files.items():
            if path and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file (give the PEM file the Redis TLS setup uses)")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--redis-cert and --redis-key go together (the client certificate and its key)")
        if self.password is not None and urlsplit(self.url).password is not None:
            raise ConfigError(f"the Redis password is given twice: in the URL ({self.masked}) and in "
                              f"--redis-password-file / ${PASSWORD_ENV}; keep one")

    def __repr__(self) -> str:
        return (f"RedisSettings(url={self.masked!r}, password={'***' if self.password else None}, "
                f"ca={self.ca!r}, cert={self.cert!r}, key={self.key!r})")

    __str__ = __repr__

    @property
    def masked(self) -> str:
        """The URL with its password masked (for logs, messages and labels)."""
        return mask_url(self.url)

    @property
    def username(self) -> str:
        """The ACL user (``default`` when the URL names none)."""
        return urlsplit(self.url).username or "default"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def client_kwargs(self) -> dict:
        """Keyword arguments for ``redis.Redis.from_url(self.url, ...)``: the password and the TLS files."""
        kwargs: dict = {}
        if self.password is not None:
            kwargs["password"] = self.password
        if self.ca:
            kwargs.update(ssl_ca_certs=self.ca, ssl_cert_reqs="required")
        if self.cert:
            kwargs.update(ssl_certfile=self.cert, ssl_keyfile=self.key)
        return kwargs

    @classmethod
    def from_args(cls, args) -> "RedisSettings":
        """From a service verb's arguments (``--redis-url``, ``--redis-password-file``, ``--redis-ca``,
        ``--redis-cert``, ``--redis-key``) and ``$REFSTREAM_REDIS_PASSWORD``."""
        password = None
        path = getattr(args, "redis_password_file", None)
        if path:
            try:
                password = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"--redis-password-file {path}: cannot read it ({exc.strerror})") from None
        elif os.environ.get(PASSWORD_ENV):
            password = os.environ[PASSWORD_ENV]
        return cls(url=args.redis_url, password=password, ca=getattr(args, "redis_ca", None),
                   cert=getattr(args, "redis_cert", None), key=getattr(args, "redis_key", None))


def as_settings(target: "RedisSettings | str") -> RedisSettings:
    """A :class:`RedisSettings` from settings or a bare URL."""
    return target if isinstance(target, RedisSettings) else RedisSettings(url=target)


def describe_error(settings: RedisSettings, exc: BaseException) -> RefStreamError | None:
    """The user-facing error for a Redis failure at connection time (None: not one a user fixes this way).

    Messages name the user, the masked URL and the TLS files, never the password.
    """
    import redis.exceptions as rex

    where = settings.masked
    text = str(exc)
    if isinstance(exc, rex.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        if settings.password is None and urlsplit(settings.url).password is None:
            return RedisAuthError(f"Redis at {where} requires a password for user {settings.username!r}: give it "
                                  f"with --redis-password-file FILE, ${PASSWORD_ENV} or in the URL")
        return RedisAuthError(f"Redis at {where} refused the password of user {settings.username!r} (wrong "
                              f"password, or the user is disabled): check --redis-password-file / "
                              f"${PASSWORD_ENV} / the URL and the server's ACL (ACL LIST)")
    if isinstance(exc, rex.NoPermissionError) or "NOPERM" in text:
        return RedisAuthError(f"Redis user {settings.username!r} at {where} lacks a right the service needs "
                              f"({text}); give it the service's ACL rule: ACL SETUSER {settings.username} "
                              f"{ACL_RULE}")
    if isinstance(exc, rex.ConnectionError):
        cause = exc.__cause__ or exc.__context__
        tls_failure = isinstance(cause, ssl.SSLError) or any(
            word in text for word in ("SSL", "certificate", "TLS", "handshake"))
        if settings.tls and (tls_failure or "Connection closed by server" in text):
            files = ", ".join(f"{flag} {path}" for flag, path in (
                ("--redis-ca", settings.ca), ("--redis-cert", settings.cert), ("--redis-key", settings.key))
                if path) or "no --redis-ca / --redis-cert / --redis-key (the system CAs)"
            return RedisTLSError(f"TLS handshake with Redis at {where} failed ({text.strip()}); files: {files}. "
                                 f"Fix: --redis-ca must be the CA that signed the server's certificate (its "
                                 f"--tls-ca-cert-file), the certificate must name the host you connect to, and a "
                                 f"server with --tls-auth-clients yes needs --redis-cert and --redis-key signed "
                                 f"by a CA it trusts")
        if not settings.tls and "Connection closed by server" in text:
            return RedisUnavailableError(f"Redis at {where} closed the connection: if the server speaks TLS, "
                                         f"use a rediss:// URL with --redis-ca")
        return RedisUnavailableError(f"Redis at {where} does not answer ({text.strip()}); start redis-server or "
                                     f"fix --redis-url / $REFSTREAM_REDIS_URL")
    return None


def check_connection(settings: RedisSettings, timeout_s: float = 5.0, unavailable_ok: bool = False) -> None:
    """Ping Redis once (no retries); with ``unavailable_ok`` a server that does not answer is not an error (the
    service's clients retry), only a refused password or a failed TLS handshake is.

    Raises:
        RedisAuthError / RedisTLSError / RedisUnavailableError: see :func:`describe_error`.
    """
    import redis
    import redis.exceptions as rex
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(settings.url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0), **settings.client_kwargs())
    try:
        client.ping()
    except rex.RedisError as exc:
        error = describe_error(settings, exc)
        if error is None:
            raise
        if unavailable_ok and isinstance(error, RedisUnavailableError):
            return
        raise error from None
    finally:
        client.close()
