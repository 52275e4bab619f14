"""A local-filesystem model registry: versioned artefacts, SHA-256 verified on every read.

Layout under ``root``::

    v1/manifest.json      files (name -> sha256), metadata, registered_at, code_version, parent
    v1/<artefact files>   raw bytes as given to :meth:`ModelRegistry.register`
    aliases.json          {"aliases": {"champion": "v1", ...}, "champion_history": ["v0", ...]}
    history.jsonl         one audit entry per line, appended

Artefacts are stored as the caller's bytes (XGBoost UBJ/JSON, transformer parameters as JSON);
nothing here unpickles anything. A version directory is built as ``v<n>.tmp`` and moved into place
with ``os.replace``, so readers never see half a version. Registrations run inside serialised
Dagster runs; alias changes (serving's admin API, the rollout, registration, the CLI) may come
from several processes, so every read-modify-write of ``aliases.json`` holds an exclusive
``flock`` on ``.aliases.lock``.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ALIASES",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "TamperedArtifactError",
    "VersionNotFound",
    "current_code_version",
    "read_verified",
    "read_version_dir",
]

ALIASES = ("champion", "challenger")
MANIFEST = "manifest.json"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
# Rollbacks can step back this many champions; older ones leave ``champion_history`` (the
# versions stay registered, and ``history.jsonl`` keeps every change).
CHAMPION_HISTORY_LIMIT = 50
MANIFEST_FORMAT = 1
GIT_TIMEOUT_S = 5.0
_CODE_DIR = Path(__file__).resolve().parent
_HEX = frozenset("0123456789abcdef")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says which version, file or key."""


class VersionNotFound(RegistryError):
    """A version or alias does not exist; the message lists what does."""


class TamperedArtifactError(RegistryError):
    """An artefact is missing or its SHA-256 differs from the one recorded at registration."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version as recorded in its ``manifest.json``."""

    version: str
    path: Path
    files: dict[str, str]
    metadata: dict[str, Any]
    registered_at: str
    code_version: str
    parent_version: str | None

    @property
    def number(self) -> int:
        """The numeric part of ``version`` (``3`` for ``"v3"``)."""
        return int(self.version[1:])

    def manifest(self) -> dict[str, Any]:
        """The manifest as stored on disk."""
        return {
            "manifest_format": MANIFEST_FORMAT,
            "version": self.version,
            "registered_at": self.registered_at,
            "code_version": self.code_version,
            "parent_version": self.parent_version,
            "files": dict(self.files),
            "metadata": self.metadata,
        }


def current_code_version() -> str:
    """``git rev-parse HEAD`` of this code's checkout, ``+dirty`` if it has uncommitted changes.

    ``"unknown"`` when the code is not in a git checkout, git is missing or too slow.
    """
    try:
        head = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if status else head


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=_CODE_DIR,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    return result.stdout.strip()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version_number(name: str) -> int | None:
    """``3`` for a version directory name ``"v3"``; ``None`` for anything else."""
    digits = name[1:]
    if name.startswith("v") and digits.isascii() and digits.isdigit() and digits[0] != "0":
        return int(digits)
    return None


def _check_file_name(name: object) -> str:
    if not isinstance(name, str):
        raise RegistryError(f"artefact file names must be strings, got {name!r}")
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name == MANIFEST
    ):
        raise RegistryError(
            f"invalid artefact file name {name!r}: use a plain file name such as 'model.ubj' "
            f"(no '/', '\\' or '..'; {MANIFEST!r} is reserved)"
        )
    return name


def _first_unjsonable(value: Any, where: str) -> str | None:
    """A description of the first value under ``where`` that strict JSON cannot hold, if any."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return f"{where} = {value!r} (NaN and infinity are not valid JSON)"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a non-string key {key!r}"
            found = _first_unjsonable(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_unjsonable(item, f"{where}[{index}]")
            if found:
                return found
    elif not (value is None or isinstance(value, str | int | float | bool)):
        return f"{where} is a {type(value).__name__}, which JSON cannot hold"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _write_durably(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelRegistry:
    """Versioned model artefacts under ``root`` with ``champion`` / ``challenger`` aliases."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    # -- versions ----------------------------------------------------------------------------------

    def register(self, files: dict[str, bytes], metadata: dict[str, Any]) -> ModelVersion:
        """Store ``files`` with ``metadata`` as the next version; its parent is the champion.

        Raises :class:`RegistryError` for a bad file name, non-bytes content, no files, or
        metadata that is not strict JSON (NaN, infinity, non-string keys, other objects).
        """
        if not isinstance(files, dict) or not files:
            raise RegistryError("register needs at least one artefact file (name -> bytes)")
        for name, data in files.items():
            _check_file_name(name)
            if not isinstance(data, bytes | bytearray):
                raise RegistryError(
                    f"artefact {name!r} must be bytes, got {type(data).__name__}; serialise "
                    "models to a safe format (XGBoost UBJ/JSON, JSON) first"
                )
        if not isinstance(metadata, dict):
            raise RegistryError(f"metadata must be a dict, got {type(metadata).__name__}")
        problem = _first_unjsonable(metadata, "metadata")
        if problem:
            raise RegistryError(f"metadata is not JSON-serialisable: {problem}")

        self.root.mkdir(parents=True, exist_ok=True)
        number = max(self._version_numbers(), default=0) + 1
        version = f"v{number}"
        champion = self._read_aliases()["aliases"].get("champion")
        model_version = ModelVersion(
            version=version,
            path=self.root / version,
            files={name: _sha256(bytes(data)) for name, data in files.items()},
            metadata=metadata,
            registered_at=_now(),
            code_version=current_code_version(),
            parent_version=champion,
        )
        try:
            manifest = json.dumps(model_version.manifest(), indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"metadata is not JSON-serialisable: {exc}") from exc

        tmp = self.root / f"{version}.tmp"
        try:
            tmp.mkdir()
        except FileExistsError:
            raise RegistryError(
                f"{tmp} already exists: another registration is in progress or one crashed "
                "part-way; remove that directory once no registration is running"
            ) from None
        for name, data in files.items():
            _write_durably(tmp / name, bytes(data))
        _write_durably(tmp / MANIFEST, manifest.encode())
        _fsync_dir(tmp)
        if model_version.path.exists():
            raise RegistryError(f"{model_version.path} appeared during registration; not replaced")
        os.replace(tmp, model_version.path)
        _fsync_dir(self.root)
        self._append_history("register", version=version, alias=None, previous=None)
        return self._load(version)

    def versions(self) -> list[ModelVersion]:
        """All registered versions, oldest first."""
        return [self._load(f"v{n}") for n in sorted(self._version_numbers())]

    def version_names(self) -> list[str]:
        """The registered version names (``v1``, ``v2``, ...), oldest first, without reading
        their manifests (one of them may be damaged)."""
        return [f"v{n}" for n in sorted(self._version_numbers())]

    @staticmethod
    def damage(version: ModelVersion) -> str | None:
        """Why an artefact of ``version`` cannot be used (missing, unreadable or not matching
        its SHA-256), or ``None`` when all are intact."""
        try:
            for name in sorted(version.files):
                read_verified(version, name)
        except RegistryError as exc:
            return str(exc)
        return None

    def get(self, ref: str) -> ModelVersion:
        """The version ``ref`` names: ``"v3"`` or an alias (``"champion"``, ``"challenger"``)."""
        return self._load(self._resolve(ref))

    def read_file(self, ref: str, name: str) -> bytes:
        """The bytes of artefact ``name`` of version ``ref``, verified against its SHA-256."""
        return read_verified(self.get(ref), name)

    # -- aliases -----------------------------------------------------------------------------------

    def aliases(self) -> dict[str, str]:
        """The aliases that are set, e.g. ``{"champion": "v1", "challenger": "v2"}``."""
        return dict(self._read_aliases()["aliases"])

    def set_alias(self, alias: str, ref: str) -> None:
        """Point ``alias`` at version ``ref``.

        Moving ``champion`` to another version pushes the old one on the champion history, so
        :meth:`rollback` can undo it like a :meth:`promote`.
        """
        self._check_alias(alias)
        version = self._resolve(ref)
        with self._alias_lock():
            state = self._read_aliases()
            previous = state["aliases"].get(alias)
            state["aliases"][alias] = version
            if alias == "champion" and previous is not None and previous != version:
                state["champion_history"].append(previous)
            self._write_aliases(state)
            self._append_history("set_alias", version=version, alias=alias, previous=previous)

    def clear_alias(self, alias: str) -> None:
        """Remove ``alias``; :class:`RegistryError` if it is not set."""
        self._check_alias(alias)
        with self._alias_lock():
            state = self._read_aliases()
            previous = state["aliases"].pop(alias, None)
            if previous is None:
                raise RegistryError(
                    f"alias {alias!r} is not set; set aliases: {self._describe(state)}"
                )
            self._write_aliases(state)
            self._append_history("clear_alias", version=None, alias=alias, previous=previous)

    def promote(self, ref: str = "challenger") -> ModelVersion:
        """Make ``ref`` the champion; the old champion is kept for :meth:`rollback`.

        When ``ref`` was the challenger, the challenger alias is cleared.
        """
        version = self._resolve(ref)
        with self._alias_lock():
            state = self._read_aliases()
            previous = state["aliases"].get("champion")
            if previous == version:
                raise RegistryError(f"{version} is already the champion")
            state["aliases"]["champion"] = version
            if previous is not None:
                state["champion_history"].append(previous)
            if state["aliases"].get("challenger") == version:
                del state["aliases"]["challenger"]
            self._write_aliases(state)
            self._append_history("promote", version=version, alias="champion", previous=previous)
        return self._load(version)

    def rollback(self) -> ModelVersion:
        """Make the previous champion the champion again."""
        with self._alias_lock():
            state = self._read_aliases()
            if not state["champion_history"]:
                raise RegistryError("no previous champion to roll back to")
            version = state["champion_history"][-1]
            restored = self._load(version)
            state["champion_history"].pop()
            previous = state["aliases"].get("champion")
            state["aliases"]["champion"] = version
            self._write_aliases(state)
            self._append_history("rollback", version=version, alias="champion", previous=previous)
        return restored

    # -- audit -------------------------------------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        """Audit entries (register, alias changes, promotions, rollbacks), oldest first."""
        path = self.root / HISTORY_FILE
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RegistryError(f"{path} line {number} is not valid JSON: {exc}") from None
            if not isinstance(entry, dict):
                raise RegistryError(f"{path} line {number} is not a JSON object")
            entries.append(entry)
        return entries

    # -- internals ---------------------------------------------------------------------------------

    def _version_numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        numbers = (_version_number(p.name) for p in self.root.iterdir() if p.is_dir())
        return [n for n in numbers if n is not None]

    def _available(self) -> str:
        versions = [f"v{n}" for n in sorted(self._version_numbers())]
        return ", ".join(versions) if versions else f"none (no versions registered in {self.root})"

    def _resolve(self, ref: str) -> str:
        """The version name that ``ref`` (a version or an alias) points to."""
        if ref in ALIASES:
            state = self._read_aliases()
            version = state["aliases"].get(ref)
            if version is None:
                raise VersionNotFound(
                    f"alias {ref!r} is not set; set aliases: {self._describe(state)}; "
                    f"versions: {self._available()}"
                )
            if not (self.root / version).is_dir():
                raise VersionNotFound(
                    f"alias {ref!r} points to {version}, which does not exist in {self.root}; "
                    f"versions: {self._available()}"
                )
            return version
        number = _version_number(ref) if isinstance(ref, str) else None
        if number is None or not (self.root / ref).is_dir():
            raise VersionNotFound(
                f"no model version {ref!r}; versions: {self._available()}; "
                f"aliases: {', '.join(ALIASES)}"
            )
        return ref

    def _load(self, version: str) -> ModelVersion:
        path = self.root / version
        manifest_path = path / MANIFEST
        try:
            raw = manifest_path.read_text()
        except FileNotFoundError:
            if not path.is_dir():
                raise VersionNotFound(
                    f"no model version {version!r}; versions: {self._available()}"
                ) from None
            raise RegistryError(f"version {version} has no {MANIFEST} ({manifest_path})") from None
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"{MANIFEST} of version {version} is corrupt ({manifest_path}): {exc}"
            ) from None
        return self._from_manifest(version, path, manifest)

    @staticmethod
    def _from_manifest(version: str, path: Path, manifest: Any) -> ModelVersion:
        def bad(reason: str) -> RegistryError:
            return RegistryError(f"{MANIFEST} of version {version} is corrupt ({path}): {reason}")

        if not isinstance(manifest, dict):
            raise bad("not a JSON object")
        required = ("version", "files", "metadata", "registered_at", "code_version")
        missing = [key for key in (*required, "parent_version") if key not in manifest]
        if missing:
            raise bad(f"missing keys: {', '.join(missing)}")
        if manifest["version"] != version:
            raise bad(f"it names version {manifest['version']!r}")
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise bad("'files' must map artefact names to sha256 digests")
        for name, digest in files.items():
            if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
                raise bad(f"artefact {name!r} has no valid sha256 ({digest!r})")
        if not isinstance(manifest["metadata"], dict):
            raise bad("'metadata' must be a JSON object")
        for key in ("registered_at", "code_version"):
            if not isinstance(manifest[key], str):
                raise bad(f"{key!r} must be a string")
        parent = manifest["parent_version"]
        if parent is not None and not isinstance(parent, str):
            raise bad("'parent_version' must be a version name or null")
        return ModelVersion(
            version=version,
            path=path,
            files=dict(files),
            metadata=manifest["metadata"],
            registered_at=manifest["registered_at"],
            code_version=manifest["code_version"],
            parent_version=parent,
        )

    @staticmethod
    def _check_alias(alias: str) -> None:
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}; allowed: {', '.join(ALIASES)}")

    @staticmethod
    def _describe(state: dict[str, Any]) -> str:
        aliases = state["aliases"]
        return ", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none"

    def _read_aliases(self) -> dict[str, Any]:
        path = self.root / ALIASES_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {"aliases": {}, "champion_history": []}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path} is corrupt: {exc}") from None
        aliases = state.get("aliases") if isinstance(state, dict) else None
        stack = state.get("champion_history") if isinstance(state, dict) else None
        if (
            not isinstance(aliases, dict)
            or not isinstance(stack, list)
            or any(a not in ALIASES or not isinstance(v, str) for a, v in aliases.items())
            or any(not isinstance(v, str) for v in stack)
        ):
            raise RegistryError(
                f"{path} is corrupt: expected {{'aliases': {{alias: version}}, "
                f"'champion_history': [version, ...]}} with aliases among {', '.join(ALIASES)}"
            )
        return {"aliases": aliases, "champion_history": stack}

    @contextlib.contextmanager
    def _alias_lock(self) -> Iterator[None]:
        """An exclusive lock (``flock``) around a read-modify-write of the aliases: serving, the
        rollout, registration and the CLI may change them from different processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".aliases.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_aliases(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state["champion_history"] = state["champion_history"][-CHAMPION_HISTORY_LIMIT:]
        data = json.dumps(state, indent=2, sort_keys=True) + "\n"
        _replace_atomically(self.root / ALIASES_FILE, data.encode())

    def _append_history(
        self, action: str, *, version: str | None, alias: str | None, previous: str | None
    ) -> None:
        """One audit line; alias changes append it under the alias lock, so the audit log's
        order is the order the changes were made."""
        entry = {
            "at": _now(),
            "action": action,
            "version": version,
            "alias": alias,
            "previous": previous,
        }
        with open(self.root / HISTORY_FILE, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_verified(version: ModelVersion, name: str) -> bytes:
    """The bytes of artefact ``name`` of ``version``, verified against its SHA-256.

    Raises :class:`TamperedArtifactError` when the file is missing or its digest differs.
    """
    _check_file_name(name)
    if name not in version.files:
        raise RegistryError(
            f"version {version.version} has no artefact {name!r}; "
            f"it has: {', '.join(sorted(version.files))}"
        )
    expected = version.files[name]
    path = version.path / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TamperedArtifactError(
            f"artefact {name!r} of version {version.version} is missing ({path}); "
            f"expected sha256 {expected}"
        ) from None
    actual = _sha256(data)
    if actual != expected:
        raise TamperedArtifactError(
            f"artefact {name!r} of version {version.version} failed verification: "
            f"expected sha256 {expected}, got {actual} ({path})"
        )
    return data


def read_version_dir(path: Path) -> ModelVersion:
    """The version whose ``manifest.json`` lies in folder ``path``, outside any registry.

    The folder may have any name (an exported copy, a Seldon model mount such as
    ``/mnt/models``); the manifest names the version. Artefacts are not read here: read them
    with :func:`read_verified`.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        raw = manifest_path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise RegistryError(
            f"{path} holds no {MANIFEST}: not a model version folder "
            "(`churn models export` writes one)"
        ) from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{manifest_path} is corrupt: {exc}") from None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if not isinstance(version, str) or _version_number(version) is None:
        raise RegistryError(
            f"{manifest_path} is corrupt: it names no version like 'v1' (got {version!r})"
        )
    return ModelRegistry._from_manifest(version, path, manifest)
