"""Images: name each (target, stage) variant, then build it with BuildKit or pull it.

The target travels to the Dockerfile as build args (``TARGET_ARCHITECTURE``,
``EPICS_TARGET_ARCH``, ``IMAGE_EXT``), never as the engine platform: every variant is built as
the target's Linux engine platform. A built image carries a label with a digest of its build
inputs, so ``auto`` can tell an up-to-date local image from a stale one without building.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors

from .config import ImageSpec, ProjectConfig
from .engine import LABEL_INPUTS, Builder, Engine, registry_of, split_ref
from .errors import ConfigError, EngineUnavailable, ImageError, PrerequisiteMissing, tail_lines
from .oci import RegistryClient, Resolved
from .targets import Target

log = logging.getLogger("pytest_epics_multiarch.images")

Progress = Callable[[str], None]


def image_ref(spec: ImageSpec, target: Target, stage: str) -> str:
    """Expand the naming template; an empty registry drops its separator."""
    ref = spec.template.format(
        registry=spec.registry,
        name=spec.name,
        image_ext=target.image_ext,
        stage=stage,
        tag=spec.tag,
        epics_arch=target.epics_arch,
    )
    return ref.lstrip("/")


@dataclass(frozen=True)
class ImageVariant:
    target: Target
    stage: str
    ref: str


@dataclass
class ImageResult:
    """What the ``ioc_image`` fixture hands out: the run stage's image for one target."""

    ref: str
    target: Target
    #: "built", "up to date", "pulled" or "local"
    how: str
    seconds: float
    image_id: str = ""
    #: The registry digest when the image came from (or went to) a registry, else the image id.
    digest: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    build_log: Path | None = None
    #: Set when the image is an index entry the engine can't pull (a custom platform): its
    #: payload is read from the registry's layer blobs.
    registry_image: Resolved | None = None

    def __str__(self) -> str:
        return self.ref


def _dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line.lstrip("/").rstrip("/"))
    return patterns


def _context_files(context: Path) -> Iterator[Path]:
    ignore = _dockerignore(context)
    for folder, dirs, files in os.walk(context):
        rel_folder = Path(folder).relative_to(context)
        dirs[:] = sorted(d for d in dirs if d != ".git" and not _ignored(str(rel_folder / d), ignore))
        for name in sorted(files):
            rel = str(rel_folder / name)
            if not _ignored(rel, ignore):
                yield context / rel


def _ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.removeprefix("./")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern + "/*"):
            excluded = not negate
    return excluded


def build_inputs_digest(
    context: Path,
    dockerfile: Path,
    args: Mapping[str, str],
    stage: str,
    platform: str,
    base_ids: Mapping[str, str],
) -> str:
    """A digest of everything that decides what a build produces."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    add("dockerfile", dockerfile.read_bytes())
    for path in _context_files(context):
        if path.is_file():
            add("file:" + str(path.relative_to(context)), path.read_bytes())
    for key in sorted(args):
        add("arg:" + key, args[key].encode())
    for key in sorted(base_ids):
        add("base:" + key, base_ids[key].encode())
    add("stage", stage.encode())
    add("platform", platform.encode())
    return "sha256:" + digest.hexdigest()


class ImageResolver:
    """Builds or pulls image variants, once per session, remembering failures too."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        build_cli_factory: Callable[[], Builder],
        *,
        policy: str,
        push: bool,
        build_timeout: float,
        log_dir: Callable[[], Path],
        progress: Progress,
        run_id: str = "",
    ) -> None:
        self._engine_factory = engine_factory
        self._build_cli_factory = build_cli_factory
        self.policy = policy
        self.push = push
        self.build_timeout = build_timeout
        self.log_dir = log_dir
        self.progress = progress
        #: Shared by the processes of one run (xdist workers): a variant is built once per run.
        self.run_id = run_id or uuid.uuid4().hex
        self._markers: list[Path] = []
        self._results: dict[tuple[str, str], ImageResult | BaseException] = {}

    def resolve(self, config: ProjectConfig, target: Target) -> ImageResult:
        """The run-stage image of ``target``, building or pulling it the first time."""
        key = (config.where, target.name)
        if key not in self._results:
            try:
                self._results[key] = self._resolve(config, target)
            except Exception as exc:
                self._results[key] = exc
        result = self._results[key]
        if isinstance(result, BaseException):
            raise result
        return result

    def results(self) -> dict[tuple[str, str], ImageResult | BaseException]:
        return dict(self._results)

    def close(self) -> None:
        """Forget this run's "built" markers (the lock files stay for the next run)."""
        for marker in self._markers:
            marker.unlink(missing_ok=True)
        self._markers.clear()

    # -- the policies ---------------------------------------------------------------------

    def _resolve(self, config: ProjectConfig, target: Target) -> ImageResult:
        if config.image is None:
            raise ConfigError(
                "no image is configured",
                target=target.name,
                seen=f"{config.where} has no image: section",
                hint="add epics-multiarch.yaml next to your tests (see the README), or pass --epics-config",
            )
        try:
            engine = self._engine_factory()
        except EngineUnavailable as exc:
            # The engine is the session's, but each target's tests skip with this message: without
            # the target, "-rs" and the report said "no Docker engine answers" for no target at all.
            raise EngineUnavailable(exc.what, target=target.name, seen=exc.seen, hint=exc.hint) from exc
        can_build = config.build.dockerfile is not None
        policy = self.policy
        if policy == "build" and not can_build:
            raise ConfigError(
                "--epics-image-policy=build, but no Dockerfile is configured",
                target=target.name,
                seen=f"{config.where} has no build: section",
                hint="add build: {context: ., dockerfile: Dockerfile}, or use --epics-image-policy=pull",
            )
        if policy == "pull" or (policy == "auto" and not can_build):
            local_ok = policy == "auto"
            return self._pull(engine, config, target, local_ok=local_ok)
        return self._build(engine, config, target, reuse=policy == "auto")

    def _variants(self, config: ProjectConfig, target: Target) -> list[ImageVariant]:
        assert config.image is not None
        return [
            ImageVariant(target, stage, image_ref(config.image, target, stage))
            for stage in config.build.stages
        ]

    def _pull(self, engine: Engine, config: ProjectConfig, target: Target, *, local_ok: bool) -> ImageResult:
        assert config.image is not None
        ref = image_ref(config.image, target, config.build.run_stage)
        started = time.monotonic()
        if local_ok:
            image_id = engine.image_id(ref)
            if image_id:
                self.progress(f"{target.name}: using local image {ref}")
                return ImageResult(ref, target, "local", 0.0, image_id, _digest(engine, ref, image_id))
        pull_ref = ref
        if target.os != "linux":
            # Images published the first way: an index entry with a custom platform such as
            # rtems/powerpc/runtime, which the engine refuses ("operating system is not
            # supported"). Read the index ourselves; the payload then comes from the layers.
            resolved = self._find_in_registry(ref, target, config.build.run_stage)
            if resolved is not None and not resolved.engine_can_pull:
                seconds = time.monotonic() - started
                entry = resolved.entry.platform if resolved.entry else None
                self.progress(f"{target.name}: reading {ref} ({entry}) from the registry, not the engine")
                return ImageResult(
                    ref, target, "in registry", seconds, "", resolved.manifest.digest, registry_image=resolved
                )
            if resolved is not None:
                pull_ref = resolved.engine_ref  # the entry's linux image, by digest
        self.progress(f"{target.name}: pulling {ref} ({target.platform})")
        self._engine_pull(engine, pull_ref, target)
        if pull_ref != ref:
            repo, tag = split_ref(ref)
            engine.client.images.get(pull_ref).tag(repo, tag)
        seconds = time.monotonic() - started
        image_id = engine.image_id(ref) or ""
        self.progress(f"{target.name}: pulled {ref} in {seconds:.1f} s")
        return ImageResult(ref, target, "pulled", seconds, image_id, _digest(engine, ref, image_id))

    def _find_in_registry(self, ref: str, target: Target, stage: str) -> Resolved | None:
        """The registry's entry for ``target`` when ``ref`` names an index, else None."""
        resolved = RegistryClient.for_reference(ref).resolve(
            ref, target.registry_platform, stage, target=target.name
        )
        return resolved if resolved.index is not None else None

    def _engine_pull(self, engine: Engine, ref: str, target: Target) -> None:
        """Pull through the engine; a refusal becomes an ImageError naming the registry."""
        try:
            engine.pull(ref, target.platform)
        except docker.errors.APIError as exc:
            seen = str(getattr(exc, "explanation", None) or exc)
            raise ImageError(
                f"could not pull {ref}",
                target=target.name,
                seen=f"registry {registry_of(ref) or '?'}: {seen}",
                hint=engine.flavor.registry_error_hint(seen)
                or "check the image name, tag and registry in epics-multiarch.yaml, that the "
                "registry runs, and that the image was pushed (or build it: --epics-image-policy=build)",
            ) from exc

    def _check_requirements(self, engine: Engine, config: ProjectConfig, target: Target) -> None:
        for requirement in config.requires_for(target):
            if engine.image_id(requirement.image) is None:
                raise PrerequisiteMissing(
                    f"the build needs image {requirement.image}, which this engine does not have",
                    target=target.name,
                    seen=f"{config.where}: targets.{target.name}.requires",
                    hint=requirement.hint or f"docker load or build {requirement.image} first",
                )

    def _build(self, engine: Engine, config: ProjectConfig, target: Target, *, reuse: bool) -> ImageResult:
        build = config.build
        assert build.context is not None and build.dockerfile is not None
        if not build.dockerfile.is_file():
            raise ConfigError(
                f"Dockerfile {build.dockerfile} does not exist",
                target=target.name,
                seen=f"{config.where}: build.dockerfile",
                hint="build.context is relative to the config file, build.dockerfile to the context",
            )
        self._check_requirements(engine, config, target)
        args = {**build.args, **target.conventional_build_args()}
        base_ids = {
            value: image_id for value in args.values() if (image_id := _maybe_image_id(engine, value))
        }
        stages: dict[str, str] = {}
        total = 0.0
        how = "up to date"
        log_path: Path | None = None
        result_id = ""
        for variant in self._variants(config, target):
            inputs = build_inputs_digest(
                build.context, build.dockerfile, args, variant.stage, target.platform, base_ids
            )
            # One build per variant across the processes of a run (pytest-xdist workers): the
            # first takes the lock and builds, the others find the result when they get it.
            with build_lock(variant.ref, self.run_id) as already_built:
                image_id = engine.image_id(variant.ref)
                current = image_id is not None and _label(engine, variant.ref, LABEL_INPUTS) == inputs
                if current and (reuse or already_built.exists()):
                    log.info("%s: %s is up to date", target.name, variant.ref)
                else:
                    seconds, log_path = self._run_build(
                        variant, build.context, build.dockerfile, args, inputs
                    )
                    total += seconds
                    how = "built"
                    image_id = engine.image_id(variant.ref)
                    if self.push:
                        self._push(engine, variant)
                    already_built.touch()
                    self._markers.append(already_built)
            stages[variant.stage] = variant.ref
            if variant.stage == build.run_stage:
                result_id = image_id or ""
        if how == "up to date":
            self.progress(f"{target.name}: images up to date ({', '.join(stages.values())})")
        ref = stages[build.run_stage]
        return ImageResult(
            ref, target, how, total, result_id, _digest(engine, ref, result_id), stages, log_path
        )

    def _run_build(
        self,
        variant: ImageVariant,
        context: Path,
        dockerfile: Path,
        args: Mapping[str, str],
        inputs: str,
    ) -> tuple[float, Path]:
        cli = self._build_cli_factory()
        target = variant.target
        argv = [
            *cli.argv(),
            "--platform",
            target.platform,
            "--target",
            variant.stage,
            "--file",
            str(dockerfile),
            "--tag",
            variant.ref,
            "--label",
            f"{LABEL_INPUTS}={inputs}",
        ]
        for key, value in sorted(args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        argv.append(str(context))
        safe = variant.ref.replace("/", "_").replace(":", "_")
        log_path = self.log_dir() / f"build-{safe}.log"
        self.progress(f"{target.name}: building {variant.ref} (stage {variant.stage}) ...")
        log.debug("build command: %s", " ".join(argv))
        started = time.monotonic()
        with open(log_path, "w") as log_file:
            log_file.write("$ " + " ".join(argv) + "\n")
            log_file.flush()
            try:
                proc = subprocess.run(
                    argv,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=cli.env(),
                    timeout=self.build_timeout,
                    check=False,
                )
                code: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {self.build_timeout:.0f} s"
        seconds = time.monotonic() - started
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            log.debug("[build %s] %s", variant.ref, line)
        if code != 0:
            raise ImageError(
                f"building {variant.ref} (stage {variant.stage}) failed",
                target=target.name,
                seen=f"{cli.describe()} exited with {code} after {seconds:.1f} s; full log: {log_path}",
                tail=tail_lines(text, 25),
                hint="run the build by hand with the command at the top of the log",
            )
        self.progress(f"{target.name}: built {variant.ref} in {seconds:.1f} s")
        return seconds, log_path

    def _push(self, engine: Engine, variant: ImageVariant) -> None:
        self.progress(f"{variant.target.name}: pushing {variant.ref}")
        try:
            engine.push(variant.ref)
        except docker.errors.APIError as exc:
            seen = str(getattr(exc, "explanation", None) or exc)
            raise ImageError(
                f"pushing {variant.ref} failed",
                target=variant.target.name,
                seen=seen,
                hint=engine.flavor.registry_error_hint(seen)
                or "is the registry running and the name's registry part right?",
            ) from exc


@contextlib.contextmanager
def build_lock(ref: str, run_id: str) -> Iterator[Path]:
    """Hold the machine-wide lock of ``ref``; yield the marker file of "built in this run"."""
    folder = Path(tempfile.gettempdir()) / "pytest-epics-multiarch-locks"
    folder.mkdir(exist_ok=True)
    key = hashlib.sha256(ref.encode()).hexdigest()[:16]
    with open(folder / f"{key}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield folder / f"{key}.{run_id}.built"
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _label(engine: Engine, ref: str, key: str) -> str | None:
    try:
        labels = engine.client.images.get(ref).labels or {}
    except docker.errors.ImageNotFound:
        return None
    value = labels.get(key)
    return str(value) if value is not None else None


def _maybe_image_id(engine: Engine, value: str) -> str | None:
    """The id of a local image a build arg names (e.g. BASE_IMAGE), so a rebuilt base counts."""
    if not value or " " in value or value != value.strip():
        return None
    return engine.image_id(value)


def _digest(engine: Engine, ref: str, image_id: str) -> str:
    """The registry digest of ``ref`` when it has one, else the local image id."""
    try:
        digests = engine.client.images.get(ref).attrs.get("RepoDigests") or []
    except docker.errors.ImageNotFound:
        return image_id
    repo, _ = split_ref(ref)
    for entry in digests:
        if entry.startswith(repo + "@"):
            return str(entry.split("@", 1)[1])
    return image_id
