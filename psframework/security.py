"""Per-job secrets: only members of the job can connect to its sockets.

ps-launch writes a secret file (mode 0600) and hands its path to every process in
``PS_SECRET_FILE``. Two mechanisms, both checked by a ZAP authenticator on every listening
socket, so a peer without the secret is refused at the handshake and logged:

- ``token``: ZeroMQ PLAIN with a random 256-bit token. Authenticates every connection at no
  cost per byte; the token crosses the wire at connect time, so use it on a network you trust
  not to be sniffed.
- ``curve``: ZeroMQ CURVE. Authenticates and encrypts everything; costs throughput (see
  benchmarks/RESULTS.md). Members prove membership with the job's client key pair; every
  listening socket (the scheduler, each server) makes a key pair of its own when it starts and
  puts the public key in its address (``tcp://HOST:PORT#KEY``, hex), so a node that connects
  knows whom it talks to, and no member can pose as the scheduler or a server (``token``
  authenticates members only).

>>> secret = JobSecret.generate("token")
>>> JobSecret.from_json(secret.to_json()) == secret
True
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
from zmq.utils import z85

from .errors import ConfigError
from .logs import RateLimitedLog

MECHANISMS = ("none", "token", "curve")
_USER = "ps"
_DOMAIN = "psframework"

log = logging.getLogger("psframework.security")


@dataclass(frozen=True)
class JobSecret:
    mechanism: str
    token: str = ""
    public_key: str = ""
    secret_key: str = ""

    @classmethod
    def generate(cls, mechanism: str) -> "JobSecret":
        if mechanism == "token":
            return cls("token", token=secrets.token_hex(32))
        if mechanism == "curve":
            if not zmq.has("curve"):
                raise ConfigError("this libzmq has no CURVE support; use --auth token")
            public, secret = zmq.curve_keypair()
            return cls("curve", public_key=public.decode(), secret_key=secret.decode())
        raise ConfigError(f"auth mechanism must be token or curve, got {mechanism!r}")

    def to_json(self) -> str:
        return json.dumps({"mechanism": self.mechanism, "token": self.token,
                           "public_key": self.public_key, "secret_key": self.secret_key})

    @classmethod
    def from_json(cls, text: str) -> "JobSecret":
        data = json.loads(text)
        secret = cls(str(data["mechanism"]), str(data.get("token", "")), str(data.get("public_key", "")),
                     str(data.get("secret_key", "")))
        if secret.mechanism not in ("token", "curve"):
            raise ValueError(f"unknown mechanism {secret.mechanism!r}")
        return secret

    def write(self, path: os.PathLike) -> Path:
        """Write atomically, readable by this user only."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: os.PathLike) -> "JobSecret":
        path = Path(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the job secret {path}: {exc.strerror}; "
                              "it is written by ps-launch (PS_SECRET_FILE)") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the job secret {path} is readable by others (mode {oct(mode & 0o777)}); "
                              f"run chmod 600 {path}")
        try:
            return cls.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"the job secret {path} is not valid: {exc}") from None

    # -- sockets -------------------------------------------------------------------------

    def secure_listener(self, sock: zmq.Socket) -> str:
        """Make ``sock`` accept members only; returns what its address must carry (the hex public
        key of the key pair made for it, with curve; empty with token)."""
        sock.zap_domain = _DOMAIN.encode()
        if self.mechanism == "token":
            sock.plain_server = True
            return ""
        public, secret = zmq.curve_keypair()
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        return z85.decode(public).hex()

    def secure_client(self, sock: zmq.Socket, server_key: str = "") -> None:
        """Present our membership; with curve, accept only the server whose key (hex, from its
        address) is ``server_key``."""
        if self.mechanism == "token":
            sock.plain_username = _USER.encode()
            sock.plain_password = self.token.encode()
            return
        if not server_key:
            raise ConfigError("with --auth curve a node's address carries its key (tcp://HOST:PORT#KEY); "
                              "this one has none: use the address the scheduler or ps-launch gave")
        sock.curve_serverkey = z85.encode(bytes.fromhex(server_key))
        sock.curve_publickey = self.public_key.encode()
        sock.curve_secretkey = self.secret_key.encode()

    def start_authenticator(self, context: zmq.Context):
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(context, log=_RefusalLog())
        auth.start()
        if self.mechanism == "token":
            auth.configure_plain(domain=_DOMAIN, passwords={_USER: self.token})
        else:
            auth.configure_curve_callback(domain=_DOMAIN, credentials_provider=_OnlyKey(self.public_key.encode()))
        return auth


class _OnlyKey:
    def __init__(self, key: bytes):
        self._key = z85.decode(key)

    def callback(self, domain: str, client_key: bytes) -> bool:
        return client_key in (self._key, z85.encode(self._key))


class _RefusalLog(logging.LoggerAdapter):
    """pyzmq's authenticator logs refusals at debug level; we want them seen, but not a flood."""

    def __init__(self):
        super().__init__(log, {})
        self._refusals = RateLimitedLog(log)

    def debug(self, msg, *args, **kwargs):
        text = str(msg)
        if "DENIED" in text or "Invalid" in text or "denied" in text.lower():
            self._refusals.warning("refused an unauthenticated peer: " + text, *args)


def load_secret(path: Optional[str]) -> Optional[JobSecret]:
    return JobSecret.load(path) if path else None
