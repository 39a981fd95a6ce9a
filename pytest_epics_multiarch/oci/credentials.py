"""Registry credentials from the user's docker config, found the way the docker CLI finds them.

``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``): ``auths.<registry>.auth``
(base64 ``user:password``, what ``docker login`` writes), ``username``/``password``,
``identitytoken``, and credential helpers (``credHelpers.<registry>``, ``credsStore``).
Secrets never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import ImageError
from .reference import DOCKER_HUB, DOCKER_HUB_AUTH_KEY

log = logging.getLogger("pytest_epics_multiarch.oci")

#: A docker config file or the folder holding ``config.json``; None: where docker looks.
AuthSource = Union[str, Path, None]

_HUB_KEYS = (DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", "registry-1.docker.io")
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True, repr=False)
class Credentials:
    """A user name with a password, or an identity (refresh) token."""

    username: str
    password: str
    identity_token: str
    #: Where they came from, for messages: "auths in /root/.docker/config.json".
    source: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r})"

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def secrets(self) -> list[str]:
        """Every form in which a secret could leak into a text, to scrub it."""
        values = [self.password, self.identity_token]
        if self.password:
            values.append(base64.b64encode(f"{self.username}:{self.password}".encode()).decode())
        return [value for value in values if len(value) >= 4]


def docker_config_path(auth_from: AuthSource = None) -> Path:
    """The docker config file: ``auth_from``, else ``$DOCKER_CONFIG``, else ``~/.docker``."""
    if auth_from is None:
        folder = os.environ.get("DOCKER_CONFIG")
        path = Path(folder) if folder else Path.home() / ".docker"
    else:
        path = Path(auth_from)
    return path / "config.json" if path.is_dir() or path.suffix != ".json" else path


def _keys_for(registry: str) -> tuple[str, ...]:
    return _HUB_KEYS if registry == DOCKER_HUB else (registry,)


def _hostname(key: str) -> str:
    """A config key as the CLI matches it: "https://ghcr.io/v1/" -> "ghcr.io"."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return key.split("/", 1)[0]


def load_credentials(registry: str, auth_from: AuthSource = None) -> Credentials | None:
    """The credentials the docker CLI would use for ``registry``; None: anonymous."""
    path = docker_config_path(auth_from)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"could not read the docker config {path}", seen=exc.strerror) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        # The position only: the text around it may be a secret.
        raise ImageError(
            f"the docker config {path} is not valid JSON",
            seen=f"line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint="fix or remove it, or log in again with docker login",
        ) from None
    if not isinstance(config, dict):
        raise ImageError(f"the docker config {path} is not a JSON object")
    keys = _keys_for(registry)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in keys:
            if isinstance(helpers.get(key), str):
                return _from_helper(helpers[key], key, path)
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if _hostname(key) in keys or key in keys:
                found = _from_auth_entry(entry, f"auths.{key} in {path}")
                if found is not None:
                    return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, keys[0], path)
    return None


def _from_auth_entry(entry: Any, source: str) -> Credentials | None:
    if not isinstance(entry, Mapping):
        return None
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ImageError(
                f"the docker config's {source.split(' in ')[0]}.auth is not base64 user:password",
                seen=source,
                hint="log in again with docker login",
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ImageError(f"the docker config's {source.split(' in ')[0]}.auth has no ':'", seen=source)
    token = str(entry.get("identitytoken") or "")
    if not (username or password or token):
        return None
    return Credentials(username, password, token, source)


def _from_helper(helper: str, server: str, config_path: Path) -> Credentials | None:
    program = f"docker-credential-{helper}"
    source = f"{program} (named in {config_path})"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ImageError(
            f"the docker config names the credential helper {program}, which is not on PATH",
            seen=str(config_path),
            hint=f"install {program}, or remove it from the config",
        ) from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{program} get did not answer within {_HELPER_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        # "credentials not found in native keychain": anonymous, as the CLI does.
        log.debug("%s has no credentials for %s (exit %s)", program, server, proc.returncode)
        return None
    try:
        answer = json.loads(proc.stdout)
        username, secret = str(answer.get("Username", "")), str(answer.get("Secret", ""))
    except (ValueError, AttributeError):
        raise ImageError(f"{program} get answered something that is not its JSON") from None
    if username == "<token>":
        return Credentials("", "", secret, source)
    return Credentials(username, secret, "", source)
