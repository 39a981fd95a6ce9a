"""The pytest plugin: options, the per-target parametrization, fixtures and report hooks.

Hooks translate pytest objects into plain arguments for :mod:`.session`; the fixtures only hand
out what it makes. Fixtures layer from general to specific: ``ioc_target`` -> ``ioc_image`` ->
``ioc`` -> ``ca``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import settings as settings_mod
from . import yamlchecks
from .ca import CAClient
from .config import ProjectConfig, find_config, find_configs_below, load_config
from .engine import Owner
from .errors import (
    ConfigError,
    EngineUnavailable,
    EpicsMultiarchError,
    PrerequisiteMissing,
)
from .images import ImageResult
from .ioc import Ioc
from .reporting import Matrix
from .runners.profiles import build_only_reason
from .session import EpicsSession
from .stash import item_iocs_key, item_target_key, kept_key, logs_key, matrix_key, session_key
from .targets import Target, TargetRegistry, builtin_targets, validate_names

log = logging.getLogger("pytest_epics_multiarch")


TARGET_FIXTURE = "ioc_target"


# -- options and configuration -------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_mod.add_options(parser)


def _arg_paths(config: pytest.Config) -> list[Path]:
    """The existing paths the command line names (node ids cut to their file)."""
    paths = []
    for arg in config.args or [str(config.invocation_params.dir)]:
        path = config.invocation_params.dir / arg.split("::")[0]  # an absolute arg stays itself
        if path.exists():
            paths.append(path)
    return paths


def _session_config_path(config: pytest.Config, explicit: Path | None) -> Path | None:
    """The config file whose ``options:`` count for the whole session."""
    if explicit is not None:
        return explicit
    return next((found for path in _arg_paths(config) if (found := find_config(path))), None)


def _known_target_names(config: pytest.Config, explicit: Path | None) -> set[str]:
    """Built-in targets plus every target a config file reachable from the arguments defines."""
    names = set(builtin_targets())
    paths: set[Path] = set()
    if explicit is not None:
        paths.add(explicit)
    else:
        for path in _arg_paths(config):
            if found := find_config(path):
                paths.add(found)
            paths.update(find_configs_below(path))
    for path in paths:
        try:
            names.update(load_config(path).registry.names())
        except ConfigError:
            continue  # reported where the config is used, with its file and key
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arch(*names): run this test only on these targets")
    config.addinivalue_line("markers", "skip_arch(*names): don't run this test on these targets")
    cli = {option.dest: config.getoption(option.dest) for option in settings_mod.OPTIONS}
    explicit = cli.get("epics_config")
    explicit_path = Path(explicit) if explicit else None
    if explicit_path is not None and not explicit_path.is_absolute():
        explicit_path = config.invocation_params.dir / explicit_path
    if explicit_path is not None and not explicit_path.is_file():
        raise pytest.UsageError(f"--epics-config: no such file: {explicit_path}")
    try:
        config_path = _session_config_path(config, explicit_path)
        project = load_config(config_path) if config_path else None
        resolved = settings_mod.resolve(
            cli,
            os.environ,
            lambda name: str(config.getini(name) or ""),
            project.options if project else {},
            config_where=str(config_path),
            cwd=config.invocation_params.dir,
            ini_dir=config.rootpath,
            config_dir=config_path.parent if config_path else None,
        )
        if resolved.config is not None and not resolved.config.is_file():
            raise ConfigError(f"{resolved.sources['config']}: no such file: {resolved.config}")
        if resolved.arch:
            validate_names(resolved.arch, _known_target_names(config, resolved.config))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    # pytest-xdist workers share the run's id: one session label, one build per variant.
    workerinput = getattr(config, "workerinput", None)
    run_id = str(workerinput["testrunuid"])[:12] if workerinput else None
    session = EpicsSession(resolved, progress=_Progress(config), owner=Owner.current(run_id))
    session.worker = str(workerinput["workerid"]) if workerinput else ""
    config.stash[session_key] = session
    try:
        registry = project.registry if project else TargetRegistry()
        names = resolved.arch or (project.default_targets if project else ()) or ("linux/amd64",)
        selected = [target.name for target in registry.resolve(names)]
    except ConfigError:
        selected = list(resolved.arch)  # a name only a nested config defines: counted when it runs
    matrix = config.stash[matrix_key] = Matrix(selected)
    config.pluginmanager.register(MatrixRecorder(matrix), "epics-multiarch-matrix")
    _terminate_like_interrupt(config)


def _terminate_like_interrupt(config: pytest.Config) -> None:
    """SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so IOCs and emulators are stopped."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone else's handler: leave it

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, interrupt)
    config.add_cleanup(restore)


class _Progress:
    """Progress lines on the terminal (and in the log), never on stdout directly."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def __call__(self, message: str) -> None:
        log.info(message)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.getoption("verbose") < 0:
            return
        # Progress comes during fixture setup, while pytest captures output: step around it.
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"epics-multiarch: {message}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash.get(session_key, None)
    if session is None:
        return []
    s = session.settings
    targets = ", ".join(s.arch) if s.arch else "the config's default_targets (else linux/amd64)"
    lines = [f"epics-multiarch: targets {targets}; images: {s.image_policy}; CA client: {s.ca_client}"]
    try:
        lines.append(f"epics-multiarch: engine {session.engine().describe()}")
    except EngineUnavailable as exc:
        lines.append(f"epics-multiarch: no engine ({exc.seen})")
    return lines


# -- one test per target --------------------------------------------------------------------------


def _marker_names(item_or_def: Any, name: str) -> list[str] | None:
    names: list[str] = []
    found = False
    for mark in item_or_def.iter_markers(name):
        found = True
        for arg in mark.args:
            names.extend(part.strip() for part in str(arg).split(",") if part.strip())
    return names if found else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if TARGET_FIXTURE not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[session_key]
    try:
        project = session.config_for(metafunc.definition.path)
        targets = project.registry.resolve(session.target_names(project))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    only = _marker_names(metafunc.definition, "arch")
    skip = _marker_names(metafunc.definition, "skip_arch") or []
    chosen = [t.name for t in targets if (only is None or t.name in only) and t.name not in skip]
    if not chosen:
        why = f"runs on {', '.join(only)}" if only is not None else f"skips {', '.join(skip)}"
        selected = ", ".join(t.name for t in targets)
        reason = f"this test {why}; the selected targets are {selected}"
        metafunc.parametrize(
            TARGET_FIXTURE, [pytest.param("", marks=pytest.mark.skip(reason=reason))], ids=["no-target"]
        )
        return
    metafunc.parametrize(TARGET_FIXTURE, chosen, indirect=True, ids=chosen, scope="module")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get(TARGET_FIXTURE) if callspec is not None else None
        if isinstance(name, str) and name:
            item.stash[item_target_key] = name
            # JUnit XML shows the target as a property of each test case.
            item.user_properties.append(("target", name))


# -- fixtures ------------------------------------------------------------------------------------


def _session(request: pytest.FixtureRequest) -> EpicsSession:
    return request.config.stash[session_key]


def _project(request: pytest.FixtureRequest) -> ProjectConfig:
    try:
        return _session(request).config_for(request.path)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def ioc_target(request: pytest.FixtureRequest) -> Target:
    """The target this test runs on (a :class:`~pytest_epics_multiarch.targets.Target`).

    Every test that uses it, directly or through ``ioc_image``/``ioc``/``ca``, runs once per
    selected target (``--arch``), with the target in its id: ``test_x[linux/amd64]``.
    """
    name = getattr(request, "param", None)
    if name is None:
        pytest.fail("ioc_target is parametrized by the plugin; it cannot be requested here", pytrace=False)
    return _project(request).target(str(name))


def _skip_or_raise(exc: EpicsMultiarchError) -> None:
    """A missing prerequisite (engine, toolchain image) skips; anything else fails the test."""
    if isinstance(exc, (PrerequisiteMissing, EngineUnavailable)):
        pytest.skip(str(exc))
    raise exc


@pytest.fixture(scope="module")
def ioc_image(request: pytest.FixtureRequest, ioc_target: Target) -> ImageResult:
    """The image of the run stage for this target: built, pulled, or up to date.

    Has ``.ref``, ``.digest``, ``.how`` ("built", "up to date", "pulled", "local") and
    ``.stages`` (stage -> ref). Built once per session per target, whatever the scope.
    """
    session = _session(request)
    try:
        image = session.image(_project(request), ioc_target)
    except EpicsMultiarchError as exc:
        _skip_or_raise(exc)
        raise
    return image


def _ioc_scope(fixture_name: str, config: pytest.Config) -> str:
    # "session" IOCs live in the session's shared pool; the fixture itself stays per module.
    scope = config.stash[session_key].settings.ioc_scope
    return "module" if scope == "session" else scope


def _start(
    request: pytest.FixtureRequest, target: Target, image: ImageResult, *, shared: bool = False
) -> Ioc:
    if not target.can_run:
        pytest.skip(build_only_reason(target))
    session = _session(request)
    try:
        if shared:
            return session.shared_ioc(_project(request), target, image)
        ioc = session.start_ioc(_project(request), target, image)
    except EpicsMultiarchError as exc:
        _skip_or_raise(exc)
        raise
    # Register the stop before anything else can fail.
    request.addfinalizer(lambda: session.iocs.release(ioc))
    return ioc


@pytest.fixture(scope=_ioc_scope)  # type: ignore[arg-type]
def ioc(request: pytest.FixtureRequest, ioc_target: Target, ioc_image: ImageResult) -> Ioc:
    """A running IOC of this target's image, ready (iocRun done, readiness PV answering).

    One IOC per target per module by default; ``--epics-ioc-scope=function`` (or ini
    ``epics_ioc_scope``) gives every test a fresh one, ``session`` one per target and
    configuration for the whole run, shared with YAML checks. Has ``.target``, ``.logs()``,
    ``.iocsh(command) -> str``, ``.stop()``, ``.ca`` and ``.ca_address``.
    """
    shared = request.config.stash[session_key].settings.ioc_scope == "session"
    return _start(request, ioc_target, ioc_image, shared=shared)


@pytest.fixture
def ca(request: pytest.FixtureRequest, ioc: Ioc) -> CAClient:
    """A Channel Access client bound to ``ioc``: it searches that IOC's address only.

    ``.get(pv)``, ``.put(pv, value)`` (waits for completion), ``.wait_for(pv, value_or_predicate,
    timeout=...)``, ``.monitor(pv)``, ``.alarm(pv)``, ``.exists(pv)``.
    """
    request.node.stash.setdefault(item_iocs_key, []).append(ioc)
    return ioc.ca


@pytest.fixture
def ioc_factory(
    request: pytest.FixtureRequest, ioc_target: Target, ioc_image: ImageResult
) -> Iterator[Callable[[], Ioc]]:
    """Start extra IOCs of this target's image for one test: ``second = ioc_factory()``.

    Each has its own CA port and its own ``.ca`` client; all are stopped when the test ends.
    """
    started: list[Ioc] = []

    def start() -> Ioc:
        new = _start(request, ioc_target, ioc_image)
        started.append(new)
        request.node.stash.setdefault(item_iocs_key, []).append(new)
        return new

    yield start


# -- reports -------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    target = item.stash.get(item_target_key, None)
    epics = item.config.stash.get(session_key, None)
    if target and epics is not None:
        # Travels with the report (to the xdist controller too) for the matrix.
        report.epics = epics.target_info(target)  # type: ignore[attr-defined]
    if report.failed:
        iocs: list[Ioc] = list(item.stash.get(item_iocs_key, ()))
        module_ioc = getattr(item, "funcargs", {}).get("ioc")
        if isinstance(module_ioc, Ioc) and module_ioc not in iocs:
            iocs.insert(0, module_ioc)
        for number, ioc_obj in enumerate(iocs):
            try:
                text = ioc_obj.logs()
            except Exception as exc:  # a dead engine must not hide the test's own failure
                text = f"(log unavailable: {exc})"
            suffix = f" #{number + 1}" if len(iocs) > 1 else ""
            report.sections.append((f"IOC log {ioc_obj.target.name}{suffix}", text[-20000:]))
        if (
            call.excinfo is not None
            and call.when == "setup"
            and call.excinfo.errisinstance(EpicsMultiarchError)
        ):
            # Our errors already say target, what, seen and hint: no traceback through fixtures.
            report.longrepr = str(call.excinfo.value)
    return report


class MatrixRecorder:
    """Counts outcomes per target (on the xdist controller too: user_properties travel)."""

    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        target = dict(report.user_properties).get("target")
        if not target:
            return
        record_outcome(self.matrix, str(target), report)
        info = getattr(report, "epics", None)
        if isinstance(info, dict):
            self.matrix.note(str(target), info)


def record_outcome(matrix: Matrix, target: str, report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            matrix.record(target, "passed", report.nodeid)
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            matrix.record(target, "skipped", report.nodeid, reason.removeprefix("Skipped: "))
        elif report.when == "setup":
            matrix.record(target, "error", report.nodeid, _one_line(report))
        else:
            matrix.record(target, "failed", report.nodeid, _one_line(report))
    elif report.when == "teardown" and report.failed:
        matrix.record(target, "error", report.nodeid, _one_line(report))


def _one_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0]
    if isinstance(report.longrepr, str):
        return report.longrepr.splitlines()[0]  # the plugin's own errors: "[target] what failed"
    return str(report.longrepr).splitlines()[-1] if report.longrepr else "failed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    epics = config.stash.get(session_key, None)
    if epics is None:
        return
    failed = exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    hints = epics.close(keep_logs=bool(failed))
    config.stash[kept_key] = hints
    if failed and epics.work_dir is not None:
        config.stash[logs_key] = epics.work_dir
    if hasattr(config, "workerinput"):
        return  # the xdist controller reports for the whole run
    matrix = config.stash[matrix_key]
    if epics.settings.report is not None:
        matrix.write(epics.settings.report)
    if epics.settings.gate:
        problems = matrix.gate_problems()
        if problems or not matrix.targets:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    epics = config.stash.get(session_key, None)
    if epics is None:
        return
    matrix = config.stash[matrix_key]
    s = epics.settings
    # A run with no IOC test (e.g. this project's unit tests) shows no matrix unless asked for.
    if matrix.targets and (matrix.counted() or s.arch or s.gate or s.report):
        terminalreporter.section("epics-multiarch target matrix")
        for line in matrix.table():
            terminalreporter.write_line(line)
    if epics.settings.gate:
        problems = matrix.gate_problems()
        terminalreporter.section("epics-multiarch release gate")
        if not matrix.targets:
            terminalreporter.write_line("gate: FAIL (no target ran)", red=True)
        for name in matrix.targets:
            why = problems.get(name)
            terminalreporter.write_line(
                f"{name}: {'FAIL: ' + why if why else 'pass'}", red=bool(why), green=not why
            )
    for hint in config.stash.get(kept_key, []):
        terminalreporter.write_line(f"kept IOC: {hint}")
    if logs_key in config.stash:
        terminalreporter.write_line(
            f"epics-multiarch: build logs and IOC consoles in {config.stash[logs_key]}"
        )
    if epics.settings.report is not None:
        terminalreporter.write_line(f"epics-multiarch: report written to {epics.settings.report}")


def pytest_unconfigure(config: pytest.Config) -> None:
    epics = config.stash.get(session_key, None)
    if epics is not None:
        epics.close()  # a safety net when the session ended early (idempotent)


# -- YAML checks ---------------------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """``test_*.ioc.yaml`` files are collected as declarative PV checks (see :mod:`.yamlchecks`)."""
    return yamlchecks.collect_file(file_path, parent)
