"""Two IOCs of the same image at once, each with its own Channel Access client.

Both IOCs serve the same PV names. ``ioc.ca`` (and the ``ca`` fixture) searches only its own
IOC's address, so a test can run a second instance and tell the two apart: here each one keeps
the setpoint it was given. ``ioc_factory()`` starts another IOC of this module's image for the
current target; it is stopped when the test ends.
"""

P = "SAMPLE:"


def test_each_client_reads_its_own_ioc(ioc, ioc_factory):
    other = ioc_factory()

    ioc.ca.put(P + "SETPOINT", 1.25)
    other.ca.put(P + "SETPOINT", -7.5)

    assert ioc.ca.get(P + "SETPOINT") == 1.25
    assert other.ca.get(P + "SETPOINT") == -7.5
    # Processing is per IOC too: each DOUBLED follows its own SETPOINT.
    ioc.ca.wait_for(P + "DOUBLED", 2.5, timeout=5)
    other.ca.wait_for(P + "DOUBLED", -15.0, timeout=5)
