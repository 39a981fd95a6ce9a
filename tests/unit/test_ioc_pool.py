"""IocPool's spare IOCs, with fake runners (no engine): handed out, replaced, discarded, stopped."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_epics_multiarch.config import IocSpec, ProjectConfig, default_config
from pytest_epics_multiarch.errors import IocStartError
from pytest_epics_multiarch.images import ImageResult
from pytest_epics_multiarch.ioc import Ioc, IocPool
from pytest_epics_multiarch.session import EpicsSession
from pytest_epics_multiarch.settings import Settings
from pytest_epics_multiarch.targets import Target

LINUX = Target("linux/amd64", "linux-x86_64")
GUEST = Target("linux/ppc64le", "linux-ppc64le", runner="qemu", qemu_profile="pseries")


class FakeRunner:
    """An IOC runner that starts at once (or when told to, or not at all) and records it all."""

    def __init__(self, number: int, log_path: Path, behaviour: dict[str, object]) -> None:
        self.number = number
        self.log_path = log_path
        self.name = f"fake {number}"
        self.ca_address = ("127.0.0.1", 5000 + number)
        self.start_seconds = 0.0
        #: "ok", "fail" (start raises) or a threading.Event the start waits for.
        self.behaviour = behaviour.get("start", "ok")
        self.start_seconds_to_report = float(behaviour.get("seconds", 0.0))  # type: ignore[arg-type]
        self.started = False
        self.started_in: str | None = None
        self.running = False
        self.stops = 0

    def start(self) -> None:
        self.started_in = threading.current_thread().name
        if isinstance(self.behaviour, threading.Event):
            assert self.behaviour.wait(10), "the test never let this start finish"
        if self.behaviour == "fail":
            raise IocStartError(f"the IOC did not reach iocRun ({self.name})", target="linux/amd64")
        self.started = True
        self.running = True
        self.start_seconds = self.start_seconds_to_report

    def stop(self) -> None:
        self.stops += 1
        self.running = False

    def is_running(self) -> bool:
        return self.running

    def logs(self) -> str:
        return f"log of {self.name}"

    def iocsh(self, command: str, timeout: float = 10.0) -> str:
        return ""

    def reach_hint(self) -> str:
        return f"reach {self.name}"


class Factory:
    """The runner factory: one FakeRunner per call; ``plan`` says how the next ones behave."""

    def __init__(self) -> None:
        self.runners: list[FakeRunner] = []
        self.plan: list[dict[str, object]] = []

    def __call__(
        self,
        config: ProjectConfig,
        target: Target,
        image: ImageResult,
        spec: IocSpec,
        ready_probe: Callable[[tuple[str, int]], None],
        log_path: Path,
    ) -> FakeRunner:
        behaviour = self.plan.pop(0) if self.plan else {}
        runner = FakeRunner(len(self.runners) + 1, log_path, behaviour)
        self.runners.append(runner)
        return runner


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def make_pool(factory: Factory, tmp_path: Path) -> Iterator[Callable[..., IocPool]]:
    pools: list[IocPool] = []

    def make(spares: int = 1, keep: bool = False) -> IocPool:
        pool = IocPool(factory, ca_backend="caproto", keep=keep, log_dir=lambda: tmp_path, spares=spares)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:  # no test leaves a spare thread running
        pool.stop_all()


def start(pool: IocPool, target: Target = LINUX, spec: IocSpec | None = None) -> Ioc:
    config = default_config()
    image = ImageResult(f"local/ioc{target.image_ext}:1", target, "local", 0.0)
    return pool.start(config, target, image, spec)


def runner_of(ioc: Ioc) -> FakeRunner:
    runner = ioc.runner
    assert isinstance(runner, FakeRunner)
    return runner


MAIN = threading.main_thread().name


def test_the_second_start_gets_the_spare_started_in_the_background(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=1)
    first = start(pool)
    assert runner_of(first).started_in == MAIN  # the first IOC of a configuration: in the caller
    assert pool.wait_for_spares(5)
    (spare,) = pool.spare_iocs()
    assert runner_of(spare).started and runner_of(spare).started_in != MAIN
    assert spare not in pool.live()  # not handed out yet
    second = start(pool)
    assert second is spare and second in pool.live()
    assert [first, second] == pool.live()
    # Each IOC has its own log, spares included.
    assert [r.log_path.name for r in factory.runners][:2] == [
        "ioc-linux-amd64-1.log",
        "ioc-linux-amd64-2.log",
    ]
    # release works on a handed-out spare as on any IOC.
    pool.release(second)
    assert runner_of(second).stops == 1 and second not in pool.live()


def test_a_handed_out_spare_is_replaced_in_the_background(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=1)
    start(pool)
    pool.wait_for_spares(5)
    second = start(pool)
    assert pool.wait_for_spares(5)
    (replacement,) = pool.spare_iocs()
    assert replacement is not second and runner_of(replacement).started
    assert runner_of(replacement).started_in != MAIN
    assert len(factory.runners) == 3  # the first, the spare handed out, its replacement
    third = start(pool)
    assert third is replacement
    pool.wait_for_spares(5)
    assert [r.started_in == MAIN for r in factory.runners] == [True, False, False, False]


def test_a_spare_still_starting_is_waited_for_and_the_wait_is_what_start_seconds_records(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    gate = threading.Event()
    factory.plan = [{"seconds": 7.5}, {"start": gate, "seconds": 7.5}]
    pool = make_pool(spares=1)
    start(pool)
    threading.Timer(0.3, gate.set).start()
    second = start(pool)  # the spare is still starting: waited for, not started anew
    assert second.runner is factory.runners[1] and runner_of(second).started_in != MAIN
    first_s, second_s = pool.start_seconds["linux/amd64"]
    # The caller's start reports the runner's start-up; a spare what the caller waited for.
    assert first_s == pytest.approx(7.5, abs=0.1)
    assert 0.2 < second_s < 5.0


def test_an_emulated_target_gets_no_spares(make_pool: Callable[..., IocPool], factory: Factory) -> None:
    pool = make_pool(spares=2)
    first = start(pool, GUEST)
    assert pool.spare_iocs() == []
    second = start(pool, GUEST)
    assert len(factory.runners) == 2
    assert runner_of(first).started_in == MAIN and runner_of(second).started_in == MAIN


def test_zero_spares_starts_every_ioc_in_the_caller(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=0)
    for _ in range(3):
        start(pool)
    assert pool.spare_iocs() == []
    assert len(factory.runners) == 3 and all(r.started_in == MAIN for r in factory.runners)


def test_spares_are_kept_per_configuration(make_pool: Callable[..., IocPool], factory: Factory) -> None:
    pool = make_pool(spares=1)
    start(pool)
    pool.wait_for_spares(5)
    other_spec = IocSpec(environment={"OTHER": "1"})
    other = start(pool, spec=other_spec)  # another ioc: section: not the spare of the first
    assert runner_of(other).started_in == MAIN
    pool.wait_for_spares(5)
    assert len(pool.spare_iocs()) == 2


def test_a_dead_spare_is_discarded_and_a_fresh_ioc_started(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=1)
    start(pool)
    pool.wait_for_spares(5)
    (spare,) = pool.spare_iocs()
    runner_of(spare).running = False  # the spare's container went away while it waited
    fresh = start(pool)
    assert fresh is not spare and runner_of(fresh).started_in == MAIN
    assert runner_of(spare).stops >= 1 and spare not in pool.live()
    pool.wait_for_spares(5)
    (replacement,) = pool.spare_iocs()
    assert replacement not in (spare, fresh)


def test_a_spare_that_failed_to_start_is_discarded_and_the_callers_error_is_its_own(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    # The first IOC starts; its spare fails; the next IOC, started in the caller, fails too: the
    # caller sees that IOC's own error, not the spare's.
    factory.plan = [{}, {"start": "fail"}, {"start": "fail"}]
    pool = make_pool(spares=1)
    start(pool)
    pool.wait_for_spares(5)
    (spare,) = pool.spare_iocs()
    with pytest.raises(IocStartError, match=r"\(fake 3\)"):
        start(pool)
    assert runner_of(spare).stops >= 1
    assert factory.runners[2].started_in == MAIN and factory.runners[2].stops == 1
    assert [runner_of(ioc) for ioc in pool.live()] == [factory.runners[0]]
    assert pool.spare_iocs() == []  # no spare after a failure


def test_a_failed_start_in_the_caller_starts_no_spare(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    factory.plan = [{"start": "fail"}]
    pool = make_pool(spares=1)
    with pytest.raises(IocStartError):
        start(pool)
    assert pool.spare_iocs() == [] and len(factory.runners) == 1 and pool.live() == []


def test_stop_all_stops_spares_including_one_still_starting(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    gate = threading.Event()
    factory.plan = [{}, {"start": gate}]
    pool = make_pool(spares=2)
    first = start(pool)
    starting, queued = (runner_of(ioc) for ioc in pool.spare_iocs())
    deadline = time.monotonic() + 5
    while starting.started_in is None:  # its thread is inside start()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopper = threading.Thread(target=pool.stop_all)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()  # it waits for the start under way, rather than leave it running
    gate.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert starting.started and starting.stops >= 1 and not starting.running
    assert not queued.started  # its start had not begun: cancelled, nothing to stop
    assert runner_of(first).stops == 1
    assert pool.live() == [] and pool.spare_iocs() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("epics-spare")]
    # A stopped pool starts no more spares.
    start(pool)
    assert pool.spare_iocs() == []


def test_keep_never_keeps_a_spare_nobody_was_given(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=1, keep=True)
    first = start(pool)
    pool.wait_for_spares(5)
    (spare,) = pool.spare_iocs()
    pool.release(first)  # kept: it started fine
    assert runner_of(first).running
    hints = pool.stop_all()
    assert hints == ["reach fake 1"]
    assert runner_of(first).running and runner_of(first).stops == 0
    assert not runner_of(spare).running and runner_of(spare).stops >= 1


def test_a_shared_ioc_takes_a_spare_but_leaves_none_behind(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=1)
    config = default_config()
    image = ImageResult("local/ioc:1", LINUX, "local", 0.0)
    shared = pool.start(config, LINUX, image, replenish=False)
    assert runner_of(shared).started_in == MAIN and pool.spare_iocs() == []
    start(pool)  # a test's own IOC of the same configuration: its spare follows
    assert pool.wait_for_spares(5)
    (spare,) = pool.spare_iocs()
    assert pool.start(config, LINUX, image, replenish=False) is spare  # taken, not replaced
    assert pool.spare_iocs() == []


def test_handed_out_spares_are_not_kept_alive_by_the_ones_after_them(
    make_pool: Callable[..., IocPool], factory: Factory
) -> None:
    pool = make_pool(spares=2)
    gone = []
    for _ in range(6):
        ioc = start(pool)
        pool.wait_for_spares(5)
        pool.release(ioc)
        gone.append(weakref.ref(ioc))
        del ioc
    gc.collect()
    assert [ref() for ref in gone] == [None] * 6


def test_keep_iocs_turns_spares_off(tmp_path: Path) -> None:
    session = EpicsSession(Settings(keep_iocs=True, spare_iocs=3), work_dir=tmp_path, progress=lambda m: None)
    try:
        assert session.iocs.spares == 0
    finally:
        session.close()
