"""Image tests of the sample IOC: how to test an IOC image with pytest-epics-multiarch.

Each test asks for fixtures and the plugin does the rest:

- ``ca``: a Channel Access client bound to the IOC under test. ``ca.get(pv)``, ``ca.put(pv,
  value)`` (returns once the IOC reports the put complete), ``ca.wait_for(pv, value_or_predicate,
  timeout=...)``, ``ca.monitor(pv)``, ``ca.alarm(pv)``, ``ca.exists(pv)``.
- ``ioc``: the running IOC: ``.target``, ``.logs()``, ``.iocsh(command)``, ``.stop()``.
- ``ioc_target`` and ``ioc_image``: the target (``.name`` like ``"linux/amd64"``) and the image
  (``.ref``, ``.digest``) the IOC runs from.

Behind them the plugin reads ``epics-multiarch.yaml``, builds the image from the Dockerfile for
each target chosen with ``--arch`` (``linux/amd64`` by default), starts one IOC per target for
this module, and runs every test once per target: ``test_setpoint_is_read[linux/amd64]``.
The same tests therefore check the soft IOC in a container and the RTEMS boot image in QEMU.

Run them with ``pytest sample_iocs --arch=linux/amd64,rtems/powerpc -v`` (``make demo``).
"""

import pytest

from pytest_epics_multiarch.errors import CAPutError

P = "SAMPLE:"


def test_setpoint_is_read(ca):
    assert isinstance(ca.get(P + "SETPOINT"), float)


def test_doubled_follows_setpoint(ca):
    ca.put(P + "SETPOINT", 12.5)
    # DOUBLED is processed through a CP link: give it a moment rather than reading at once.
    ca.wait_for(P + "DOUBLED", 25.0, timeout=5)


def test_setpoint_is_clipped_to_drive_limits(ca):
    ca.put(P + "SETPOINT", 500)
    assert ca.get(P + "SETPOINT") == 100.0


def test_counter_counts(ca):
    start = ca.get(P + "COUNTER")
    # SCAN "1 second": it must move on within a few seconds.
    ca.wait_for(P + "COUNTER", lambda value: value >= start + 2, timeout=5)


def test_counter_updates_arrive_as_monitor_events(ca):
    with ca.monitor(P + "COUNTER") as updates:
        first = updates.next(timeout=5)
        second = updates.next(timeout=5)
    assert second > first


def test_message_string_round_trip(ca):
    ca.put(P + "MESSAGE", "written by pytest")
    assert ca.get(P + "MESSAGE") == "written by pytest"


def test_mode_by_name_and_by_index(ca):
    ca.put(P + "MODE", "Auto")
    assert ca.get(P + "MODE") == 2
    assert ca.get(P + "MODE", as_string=True) == "Auto"

    ca.put(P + "MODE", 1)
    assert ca.get(P + "MODE", as_string=True) == "On"


@pytest.mark.parametrize(
    "temperature, alarm",
    [
        (20, ("NO_ALARM", "NO_ALARM")),
        (75, ("MINOR", "HIGH")),
        (95, ("MAJOR", "HIHI")),
    ],
)
def test_temperature_alarms(ca, temperature, alarm):
    ca.put(P + "TEMPERATURE", temperature)
    assert ca.alarm(P + "TEMPERATURE") == alarm


def test_waveform_put_and_get(ca):
    ca.put(P + "WAVE", [1.5, 2.5, 3.5])
    # The waveform holds 8 elements; NORD says 3 are in use.
    assert ca.get(P + "WAVE")[:3] == [1.5, 2.5, 3.5]
    assert ca.get(P + "WAVE.NORD") == 3


def test_readonly_refuses_puts(ca):
    # READONLY has DISP=1: the IOC answers the put with a failure, and the value stays.
    with pytest.raises(CAPutError):
        ca.put(P + "READONLY", 7)
    assert ca.get(P + "READONLY") == 42.0


def test_iocsh_shows_the_value(ca, ioc):
    ca.put(P + "SETPOINT", 33.25)
    # dbgf prints the field as the IOC holds it: DBF_DOUBLE: 33.25
    assert "33.25" in ioc.iocsh("dbgf SAMPLE:SETPOINT")


def test_image_and_target_are_known(ioc_target, ioc_image, ioc):
    assert ioc.target.name == ioc_target.name
    assert ioc_image.digest.startswith("sha256:")
    assert "iocRun: All initialization complete" in ioc.logs()
