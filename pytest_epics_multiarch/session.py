"""Everything one test session owns: settings, configs, the engine, images, IOCs, results.

The plugin builds one :class:`EpicsSession` from pytest's config and keeps it in the config's
stash; fixtures ask it for images and IOCs. It can be built and used without pytest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigCache, IocSpec, ProjectConfig
from .engine import Builder, Engine, Owner, find_builder
from .errors import ConfigError, EngineUnavailable, ImageError, IocStartError
from .images import ImageResolver, ImageResult
from .ioc import Ioc, IocKey, IocPool, ioc_key
from .payload import Payload
from .runners.base import IocRunner, ReadyProbe
from .settings import Settings
from .targets import EMULATED_BSPS, Target

log = logging.getLogger("pytest_epics_multiarch")


class EpicsSession:
    def __init__(
        self,
        settings: Settings,
        *,
        work_dir: Path | None = None,
        progress: Callable[[str], None],
        owner: Owner | None = None,
        engine_factory: Callable[[], Engine] | None = None,
    ) -> None:
        self.settings = settings
        #: Build logs, IOC consoles, boot payloads. Ours to remove only when we made it.
        self.work_dir = work_dir or settings.log_dir
        self._owns_work_dir = False
        #: The xdist worker id ("gw0"): workers sharing a --epics-log-dir write in subfolders.
        self.worker = ""
        self.progress = progress
        self.owner = owner or Owner.current()
        self.configs = ConfigCache(settings.config)
        self._engine_factory = engine_factory or (lambda: Engine.connect(choice=settings.engine))
        self._engine: Engine | EngineUnavailable | None = None
        self._build_cli: Builder | None = None
        self.swept: list[str] = []
        self._payloads: dict[tuple[str, bool], Payload] = {}
        self._shared: dict[IocKey, Ioc] = {}
        self.images = ImageResolver(
            self.engine,
            self.build_cli,
            policy=settings.image_policy,
            push=settings.push,
            build_timeout=settings.build_timeout,
            log_dir=self.log_dir,
            progress=progress,
            run_id=self.owner.session,
        )
        self.iocs = IocPool(
            self._make_runner,
            ca_backend=settings.ca_client,
            keep=settings.keep_iocs,
            log_dir=self.log_dir,
            # --epics-keep-iocs labels containers kept, which no later session sweeps: a spare
            # left by a killed session would stay for good. Keeping is for debugging: no spares.
            spares=0 if settings.keep_iocs else settings.spare_iocs,
        )

    def log_dir(self) -> Path:
        """Where build logs and IOC consoles are written (a temp dir when none was given)."""
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="pytest-epics-multiarch-"))
            self._owns_work_dir = True
        folder = self.work_dir / self.worker if self.worker else self.work_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- shared resources, created on first use -------------------------------------------------

    def engine(self) -> Engine:
        """The engine, connected once; a missing engine is remembered and raised again."""
        if self._engine is None:
            try:
                engine = self._engine_factory()
            except EngineUnavailable as exc:
                self._engine = exc
            else:
                self._engine = engine
                self.swept = engine.sweep_leftovers(self.owner.host)
                if self.swept:
                    self.progress(f"removed {len(self.swept)} leftover IOC container(s) of dead sessions")
        if isinstance(self._engine, EngineUnavailable):
            raise self._engine
        return self._engine

    def engine_if_connected(self) -> Engine | None:
        return self._engine if isinstance(self._engine, Engine) else None

    def build_cli(self) -> Builder:
        if self._build_cli is None:
            self._build_cli = find_builder(self.engine(), self.settings.docker_cli)
            log.info("building with %s", self._build_cli.describe())
        return self._build_cli

    # -- what fixtures ask for ------------------------------------------------------------------

    def config_for(self, path: Path) -> ProjectConfig:
        return self.configs.for_path(path)

    def target_names(self, config: ProjectConfig) -> list[str]:
        """The selected target names for tests under ``config``."""
        return list(self.settings.arch or config.default_targets or ("linux/amd64",))

    def image(self, config: ProjectConfig, target: Target) -> ImageResult:
        return self.images.resolve(config, target)

    def start_ioc(
        self, config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec | None = None
    ) -> Ioc:
        """A new IOC, stopped by whoever asked for it (or at the session's end)."""
        return self.iocs.start(config, target, image, spec)

    def shared_ioc(
        self, config: ProjectConfig, target: Target, image: ImageResult, spec: IocSpec | None = None
    ) -> Ioc:
        """The session's IOC for this configuration: started once, reused while it runs.

        YAML checks (and Python tests under ``--epics-ioc-scope=session``) share IOCs whose
        config file, target, image and ``ioc:`` settings are identical.
        """
        spec = spec or config.ioc_for(target)
        key = ioc_key(config, target, image, spec)
        ioc = self._shared.get(key)
        if ioc is None or not ioc.is_running():
            # No spare: the shared IOC serves the session, so one would only idle beside it.
            ioc = self._shared[key] = self.iocs.start(config, target, image, spec, replenish=False)
        return ioc

    def _make_runner(
        self,
        config: ProjectConfig,
        target: Target,
        image: ImageResult,
        spec: IocSpec,
        ready_probe: ReadyProbe,
        log_path: Path,
    ) -> IocRunner:
        timeout = self.settings.start_timeout or spec.start_timeout
        if target.runner == "container":
            from .runners.container import ContainerIoc

            if image.registry_image is not None:
                raise ImageError(
                    f"{image.ref} is a {image.registry_image.config_os} image the engine can't run",
                    target=target.name,
                    seen="its registry index entry has a non-Linux platform",
                    hint="container targets need a Linux entry; emulated targets (runner: qemu) read "
                    "such an entry's payload from the registry",
                )

            command = (
                [part.replace("{startup}", spec.startup or "") for part in spec.command]
                if spec.command
                else None
            )
            return ContainerIoc(
                self.engine(),
                image.ref,
                target=target.name,
                labels=self.owner.labels(keep=self.settings.keep_iocs),
                command=command,
                environment=spec.environment,
                workdir=spec.workdir,
                start_timeout=timeout,
                log_path=log_path,
                ready_probe=ready_probe,
            )
        if target.runner == "qemu":
            return self._make_qemu_runner(config, target, image, spec, ready_probe, log_path)
        raise ConfigError(
            f"cannot run target {target.name} (runner {target.runner!r})",
            target=target.name,
            hint="emulated BSPs: " + ", ".join(EMULATED_BSPS),
        )

    def _make_qemu_runner(
        self,
        config: ProjectConfig,
        target: Target,
        image: ImageResult,
        spec: IocSpec,
        ready_probe: ReadyProbe,
        log_path: Path,
    ) -> IocRunner:
        from .oci import RegistryClient, payload_from_layers
        from .payload import extract_payload, label_overrides
        from .runners.profiles import resolve_qemu
        from .runners.qemu import QemuIoc

        engine = self.engine()
        remote = image.registry_image
        labels = remote.labels() if remote else (engine.client.images.get(image.ref).labels or {})
        qemu, profile = resolve_qemu(
            default_profile=target.qemu_profile,
            epics_arch=target.epics_arch,
            section=config.qemu.get(target.name, {}),
            labels=label_overrides(labels),
            startup=spec.startup,
            workdir=spec.workdir,
            where=config.where,
        )
        key = (image.image_id or image.digest or image.ref, qemu.serve_startup)
        if key not in self._payloads:
            dest = self.log_dir() / f"payload-{len(self._payloads) + 1}"
            if remote is not None:
                # An index entry the engine refuses: the boot payload comes from the layer blobs.
                client = RegistryClient.for_reference(image.ref)
                self._payloads[key] = payload_from_layers(
                    client, remote.manifest, qemu.payload_paths(), dest, target=target.name
                )
            else:
                self._payloads[key] = extract_payload(
                    engine,
                    image.ref,
                    qemu.payload_paths(),
                    dest,
                    target=target.name,
                    labels=self.owner.labels(),
                )
        if not qemu.serve_startup:
            self._claim_fixed_port(target, qemu.ca_port)
        return QemuIoc(
            target=target.name,
            profile=profile,
            payload=self._payloads[key],
            settings=qemu,
            work_dir=log_path.with_suffix(""),
            start_timeout=self.settings.start_timeout or qemu.boot_timeout,
            log_path=log_path,
            ready_probe=ready_probe,
            labels=self.owner.labels(keep=self.settings.keep_iocs),
        )

    def _claim_fixed_port(self, target: Target, port: int) -> None:
        """IOCs with their startup files compiled in share one CA port: one at a time."""
        for ioc in self.iocs.live():
            if ioc.ca_address[1] == port and ioc.is_running():
                raise IocStartError(
                    f"another IOC already serves CA on port {port}",
                    target=target.name,
                    seen=f"{ioc.name} ({ioc.target.name}) has the port its boot image fixes",
                    hint="IOCs whose startup files are compiled into the boot image (qemu.serve_startup: "
                    "false) can't run side by side; serve st.cmd over TFTP to give each IOC its own port",
                )

    def target_info(self, target: str) -> dict[str, Any]:
        """What the matrix shows of a target: its image and its IOCs' start-up seconds."""
        info: dict[str, Any] = {}
        for (_, name), result in self.images.results().items():
            if name != target:
                continue
            if isinstance(result, ImageResult):
                info.update(image=result.ref, digest=result.digest, how=result.how, build_s=result.seconds)
            else:
                info["reason"] = str(result).splitlines()[0]
        starts = self.iocs.start_seconds.get(target)
        if starts:
            info["start_s"] = max(starts)
        return info

    def close(self, *, keep_logs: bool = False) -> list[str]:
        """Stop every IOC of the session; return how to reach the kept ones.

        The temporary work folder goes too, unless ``keep_logs`` (a failing run) or IOCs are
        kept running (their consoles write there).
        """
        self.images.close()
        hints = self.iocs.stop_all()
        engine = self.engine_if_connected()
        if engine is not None:
            engine.close()
            # Not None: a late call must not connect again (or start another Podman service).
            self._engine = EngineUnavailable("the session has ended and closed its engine")
        if self._owns_work_dir and self.work_dir is not None and not keep_logs and not hints:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
            self._owns_work_dir = False
        return hints
