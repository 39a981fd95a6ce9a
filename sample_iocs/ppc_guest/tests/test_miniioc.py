"""Host tests of the guest IOC's parsers, calc engine, records and shell (no CA, no QEMU)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from miniioc.calc import CalcError, evaluate, used_variables
from miniioc.database import Database
from miniioc.dbparse import DbParseError, parse_db
from miniioc.dbtest import TabBuffer, format_dbgf
from miniioc.files import LocalFiles
from miniioc.iocsh import IocShell, split_command
from miniioc.macros import MacroError, chain_lookup, expand, parse_definitions
from miniioc.records import (
    INVALID,
    MAJOR,
    MINOR,
    NO_ALARM,
    STAT,
    DatabaseError,
    PutDisabled,
    parse_link,
)

# -- macros ---------------------------------------------------------------------------------


def test_expand_both_brackets_defaults_and_nesting() -> None:
    lookup = chain_lookup({"P": "X:", "N": "1", "X:1": "nested"})
    assert expand("$(P)ao ${P}bo", lookup) == "X:ao X:bo"
    assert expand("$(Q=def)$(P=unused)", lookup) == "defX:"
    assert expand("$($(P)$(N))", lookup) == "nested"


def test_undefined_macro_is_kept_and_reported() -> None:
    seen = []
    assert expand("$(P)a$(MISSING)", chain_lookup({"P": "X"}), seen.append) == "Xa$(MISSING)"
    assert seen == ["MISSING"]


def test_recursive_macro_is_an_error() -> None:
    with pytest.raises(MacroError, match="too deep"):
        expand("$(A)", chain_lookup({"A": "$(A)"}))


def test_parse_definitions_quotes_and_blanks() -> None:
    assert parse_definitions('P=X:, Q="a, b",R=,S') == {"P": "X:", "Q": "a, b", "R": ""}


# -- database files -------------------------------------------------------------------------

DB = """
# a comment
record(ao, "$(P)ao") {
    field(DRVH, "10")
    field(DESC, "set \\"point\\"")   # trailing comment
    info(autosaveFields, "VAL")
    alias("$(P)setpoint")
}
grecord(stringout, $(P)so) { field(VAL, "hi") }
alias("$(P)ao", "$(P)other")
record(*, "$(P)ao") { field(DRVL, "-10") }
"""


def test_parse_db_records_fields_aliases() -> None:
    contents = parse_db(DB, "t.db", chain_lookup({"P": "X:"}))
    ao, so, patch = contents.records
    assert (ao.rtype, ao.name) == ("ao", "X:ao")
    assert ao.fields == {"DRVH": "10", "DESC": 'set "point"'}
    assert ao.infos == {"autosaveFields": "VAL"}
    assert ao.aliases == ["X:setpoint"]
    assert (so.rtype, so.name, so.fields) == ("stringout", "X:so", {"VAL": "hi"})
    assert patch.rtype == "*"
    assert contents.aliases == [("X:ao", "X:other")]


def test_parse_skips_dbd_definitions_and_c_lines() -> None:
    dbd = """
    menu(menuYesNo) { choice(menuYesNoNO, "NO") choice(menuYesNoYES, "YES") }
    recordtype(ai) {
        include "dbCommon.dbd"
        %#include "epicsTypes.h"
        field(VAL, DBF_DOUBLE) { prompt("Current EGU Value") pp(TRUE) }
    }
    device(ai, CONSTANT, devAiSoft, "Soft Channel")
    registrar(asSub)
    variable(dbRecordsOnceOnly, int)
    record(ai, "in") {}
    """
    contents = parse_db(dbd, "x.dbd")
    assert [r.name for r in contents.records] == ["in"]


def test_parse_include_reads_through_callback() -> None:
    files = {"inner.db": 'record(bi, "$(P)inner") {}'}
    contents = parse_db(
        'include "inner.db"\nrecord(bo, "$(P)outer") {}',
        "outer.db",
        chain_lookup({"P": "Q:"}),
        read_include=lambda name: (name, files[name]),
    )
    assert [r.name for r in contents.records] == ["Q:inner", "Q:outer"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('record(ao, "x") { field(VAL "1") }', "t.db:1: expected ')'"),
        ('record(ao, "x") {\n  feld(VAL, "1")\n}', "t.db:2: unknown item 'feld'"),
        ('record(ao, "x) {}', "t.db:1: unterminated string"),
        ("record(ao) {}", "t.db:1: record() needs (type, name)"),
    ],
)
def test_parse_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(DbParseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_db(text, "t.db")


# -- calc -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "env", "expected"),
    [
        ("A+B*2", {"A": 1, "B": 3}, 7),
        ("(A+B)*2", {"A": 1, "B": 3}, 8),
        ("A-B-C", {"A": 10, "B": 3, "C": 2}, 5),
        ("A/B", {"A": 7, "B": 2}, 3.5),
        ("-A^2", {"A": 3}, -9),
        ("2**3**2", {}, 512),
        ("A%3", {"A": 10}, 1),
        ("A>B?A:B", {"A": 2, "B": 5}, 5),
        ("A>B?A", {"A": 2, "B": 5, "VAL": 42}, 42),
        ("A&&B||!C", {"A": 1, "B": 0, "C": 0}, 1),
        ("A=2", {"A": 2}, 1),
        ("A#2", {"A": 2}, 0),
        ("A|4 AND 6", {"A": 1}, 5),
        ("A XOR 3", {"A": 5}, 6),
        ("~0", {}, -1),
        ("1<<4 >> 2", {}, 4),
        ("MAX(A,B,C)+MIN(A,B)", {"A": 1, "B": 9, "C": 4}, 10),
        ("SQR(16)+ABS(-2)", {}, 6),
        ("NINT(2.5)+NINT(-2.5)+FLOOR(1.7)+CEIL(1.2)", {}, 3),
        ("sin(0)+cos(0)", {}, 1),
        ("LOG(100)+LN(1)+EXP(0)", {}, 3),
        ("D2R*180-PI", {}, 0),
        ("0x10+.5+1e1", {}, 26.5),
        ("ATAN2(1,0)", {}, 0),
        ("VAL+1", {"VAL": 41}, 42),
    ],
)
def test_calc_values(expression: str, env: dict[str, float], expected: float) -> None:
    assert evaluate(expression, env) == pytest.approx(expected)


def test_calc_division_by_zero_follows_ieee() -> None:
    assert evaluate("1/0") == math.inf
    assert evaluate("-1/0") == -math.inf
    assert math.isnan(evaluate("0/0"))


@pytest.mark.parametrize("expression", ["A+", "(A", "FOO(1)", "A:=1", "A B", "SIN(1,2)", "$"])
def test_calc_errors(expression: str) -> None:
    with pytest.raises(CalcError):
        evaluate(expression, {"A": 1})


def test_used_variables() -> None:
    assert used_variables("A+c*A+VAL") == ["A", "C"]


# -- records ----------------------------------------------------------------------------------


def make_db(text: str, macros: str = "") -> Database:
    db = Database()
    db.load(parse_db(text, "t.db", chain_lookup(parse_definitions(macros))))
    db.initialize()
    db.take_posted()
    return db


def test_parse_link_forms() -> None:
    link = parse_link("X:ao.HIHI PP MS")
    assert link is not None
    assert (link.record_name, link.field, link.process, link.severity) == ("X:ao", "HIHI", "PP", "MS")
    constant = parse_link("3.5")
    assert constant is not None and constant.constant == 3.5
    json_const = parse_link('{const: "abc"}')
    assert json_const is not None and json_const.constant == "abc"
    assert parse_link("  ") is None
    with pytest.raises(DatabaseError, match="Bad link modifier"):
        parse_link("X:ao FOO")


def test_ao_clamps_to_drvh_drvl_and_raises_limit_alarms() -> None:
    db = make_db(
        'record(ao, "ao") { field(DRVH, "10") field(DRVL, "-10") field(VAL, "1")'
        ' field(HIHI, "8") field(HHSV, "MAJOR") field(LOW, "-5") field(LSV, "MINOR") }'
    )
    record = db.put("ao", 50)
    assert (record.value, record.status, record.severity) == (10.0, STAT["HIHI"], MAJOR)
    db.put("ao", "-7")
    assert (record.value, record.status, record.severity) == (-7.0, STAT["LOW"], MINOR)
    db.put("ao.VAL", 0)
    assert (record.value, record.status, record.severity) == (0.0, NO_ALARM, NO_ALARM)


def test_limit_without_severity_raises_nothing() -> None:
    db = make_db('record(ai, "ai") { field(HIHI, "1") }')
    record = db.put("ai", 5)
    assert (record.status, record.severity) == (NO_ALARM, NO_ALARM)


def test_records_without_val_are_udf_until_written() -> None:
    db = make_db('record(ao, "ao") {}\nrecord(stringout, "so") { field(VAL, "x") }')
    ao, so = db.records["ao"], db.records["so"]
    assert (ao.status, ao.severity) == (STAT["UDF"], INVALID)
    assert (so.status, so.severity) == (NO_ALARM, NO_ALARM)
    db.put("ao", 1)
    assert (ao.status, ao.severity) == (NO_ALARM, NO_ALARM)


def test_calc_follows_cp_input_and_chains() -> None:
    db = make_db(
        """
        record(ao, "$(P)ao") { field(VAL, "1") }
        record(calc, "$(P)double") { field(INPA, "$(P)ao CP") field(CALC, "A*2") }
        record(calc, "$(P)plus") { field(INPA, "$(P)double CP MS") field(INPB, "5") field(CALC, "A+B") }
        """,
        "P=X:",
    )
    db.put("X:ao", 4)
    assert db.records["X:double"].value == 8
    assert db.records["X:plus"].value == 13
    posted = [record.name for record in db.take_posted()]
    assert posted == ["X:ao", "X:double", "X:plus"]


def test_periodic_counter_reads_itself() -> None:
    db = make_db('record(calc, "cnt") { field(SCAN, "1 second") field(INPA, "cnt") field(CALC, "A+1") }')
    assert db.periodic_groups() == {1.0: [db.records["cnt"]]}
    for _ in range(3):
        db.process(db.records["cnt"])
    assert db.records["cnt"].value == 3


def test_pini_flnk_pp_and_out_links() -> None:
    db = make_db(
        """
        record(ao, "src") { field(VAL, "2") field(PINI, "YES") field(OUT, "dst PP") field(FLNK, "fwd") }
        record(ao, "dst") { field(FLNK, "calc") }
        record(calc, "calc") { field(INPA, "dst") field(CALC, "A*10") }
        record(calc, "fwd") { field(INPA, "src.VAL NPP") field(CALC, "A+0.5") }
        record(ai, "reader") { field(INP, "calc PP") }
        """
    )
    # PINI processed src at iocInit: OUT (PP) wrote dst, dst's FLNK ran calc, src's FLNK ran fwd.
    assert db.records["dst"].value == 2
    assert db.records["calc"].value == 20
    assert db.records["fwd"].value == 2.5
    db.put("dst", 3)
    db.process(db.records["reader"])
    assert db.records["reader"].value == 30


def test_enum_records_states_and_severities() -> None:
    db = make_db(
        """
        record(bo, "bo") { field(ZNAM, "Off") field(ONAM, "On") field(OSV, "MINOR") }
        record(mbbo, "mbbo") { field(ZRST, "Zero") field(ONST, "One") field(TWST, "Two")
                               field(TWSV, "MAJOR") field(UNSV, "INVALID") }
        """
    )
    bo = db.put("bo", "On")
    assert (bo.value, bo.get_field("VAL"), bo.severity) == (1, ("ENUM", "On"), MINOR)
    mbbo = db.put("mbbo", "Two")
    assert (mbbo.value, mbbo.status, mbbo.severity) == (2, STAT["STATE"], MAJOR)
    db.put("mbbo", 7)
    assert (mbbo.get_field("VAL"), mbbo.severity) == (("ENUM", "7"), INVALID)
    assert mbbo.enum_strings() == ["Zero", "One", "Two"]
    assert mbbo.enum_strings_for(4) == ["Zero", "One", "Two", "3", "4"]
    with pytest.raises(DatabaseError, match="not a state"):
        db.put("bo", "Maybe")
    with pytest.raises(DatabaseError, match="out of range"):
        db.put("mbbo", 16)


def test_waveform_and_string_conversions() -> None:
    db = make_db(
        """
        record(waveform, "wf") { field(NELM, "3") field(FTVL, "LONG") }
        record(waveform, "cwf") { field(NELM, "10") field(FTVL, "CHAR") }
        record(stringout, "so") {}
        record(longout, "lo") {}
        """
    )
    assert db.records["wf"].udf
    assert db.put("wf", "1 2 3 4").value == [1, 2, 3]
    assert db.put("cwf", "hi").value == [104, 105, 0]
    assert db.put("so", "x" * 60).value == "x" * 39
    assert db.put("so", 2.5).value == "2.5"
    assert db.put("lo", "3.9").value == 3
    with pytest.raises(DatabaseError):
        db.put("lo", "abc")


def test_disp_refuses_puts_from_outside_except_to_disp_itself() -> None:
    db = make_db(
        """
        record(ao, "ro") { field(VAL, "42") field(DISP, "1") }
        record(ao, "src") { field(OUT, "ro PP") }
        """
    )
    ro = db.records["ro"]
    with pytest.raises(PutDisabled, match="Put disabled"):
        db.put("ro", 7)
    with pytest.raises(PutDisabled):
        db.put("ro.EGU", "mm")
    assert (ro.value, ro.text("EGU")) == (42.0, "")
    db.put("ro.DISP", 0)
    assert db.put("ro", 7).value == 7.0
    db.put("ro.DISP", "1")
    assert ro.get_field("DISP") == ("UCHAR", 1)
    # Links write with dbPut, which does not look at DISP.
    db.put("src", 5)
    assert ro.value == 5.0


def test_fields_have_epics_types_and_defaults() -> None:
    db = make_db(
        """
        record(ao, "ao") { field(PREC, "2") field(EGU, "V") field(HHSV, "MAJOR") field(DRVH, "10") }
        record(mbbo, "mode") { field(ZRST, "Off") field(ONVL, "1") }
        record(waveform, "wf") { field(NELM, "8") field(FTVL, "DOUBLE") }
        record(longout, "lo") { field(HOPR, "7") }
        record(stringout, "so") {}
        """
    )
    ao, mode, wf = db.records["ao"], db.records["mode"], db.records["wf"]
    assert ao.get_field("PREC") == ("SHORT", 2)
    assert ao.get_field("EGU") == ("STRING", "V")
    assert ao.get_field("HHSV") == ("ENUM", "MAJOR")
    assert ao.get_field("HSV") == ("ENUM", "NO_ALARM")  # not set: the default
    assert ao.get_field("DRVH") == ("DOUBLE", 10.0)
    assert ao.get_field("DISP") == ("UCHAR", 0)
    assert ao.get_field("DESC") == ("STRING", "")
    assert ao.get_field("OUT") == ("STRING", "")
    assert mode.get_field("ZRST") == ("STRING", "Off")
    assert mode.get_field("ONVL") == ("ULONG", 1)
    assert db.records["lo"].get_field("HOPR") == ("LONG", 7)
    db.put("wf", [1.5, 2.5, 3.5])
    assert (wf.get_field("NORD"), wf.get_field("NELM")) == (("ULONG", 3), ("ULONG", 8))
    assert wf.get_field("PREC") == ("SHORT", 0)
    assert ao.field_choices("STAT")[17] == "UDF"
    for record, field in ((db.records["so"], "PREC"), (ao, "NOPE"), (wf, "DRVH")):
        with pytest.raises(KeyError):
            record.get_field(field)


def test_load_errors() -> None:
    db = Database()
    with pytest.raises(DatabaseError, match='unknown type "calcout"'):
        db.load(parse_db('record(calcout, "x") {}'))
    db.load(parse_db('record(ao, "x") {}'))
    with pytest.raises(DatabaseError, match="redefined"):
        db.load(parse_db('record(bo, "x") {}'))
    with pytest.raises(DatabaseError, match="Illegal CALC"):
        db.load(parse_db('record(calc, "c") { field(CALC, "A+") }'))


def test_missing_link_target_is_warned_and_alarms() -> None:
    db = Database()
    db.load(parse_db('record(calc, "c") { field(INPA, "elsewhere:pv CP") field(CALC, "A") }'))
    warnings = db.initialize()
    assert warnings == [
        "c.INPA: no record 'elsewhere:pv' in this IOC (links to other IOCs are not supported)"
    ]
    db.process(db.records["c"])
    assert (db.records["c"].status, db.records["c"].severity) == (STAT["LINK"], INVALID)


# -- dbgf formatting ----------------------------------------------------------------------------


def test_dbgf_matches_epics_layout() -> None:
    # EPICS pads each piece to the next 10-column tab stop, trailing blanks included.
    assert format_dbgf("DOUBLE", 3.0) == "DBF_DOUBLE:         3         \n"
    assert format_dbgf("DOUBLE", 0.1 + 0.2) == "DBF_DOUBLE:         0.3       \n"
    # A piece that ends exactly on a tab stop still moves on to the next one.
    assert format_dbgf("LONG", 255) == "DBF_LONG:           255 = 0xff          \n"
    assert format_dbgf("LONG", -1) == "DBF_LONG:           -1 = 0xffffffff     \n"
    assert format_dbgf("ENUM", "On") == 'DBF_STRING:         "On"      \n'
    assert format_dbgf("STRING", 'a"b') == 'DBF_STRING:         "a\\"b"    \n'
    assert format_dbgf("LONG", []) == ""
    assert format_dbgf("DOUBLE", [1.0, 2.5]) == "DBF_DOUBLE[2]:      1         2.5       \n"
    assert format_dbgf("CHAR", [104, 105, 0]) == 'DBF_CHAR[3]:        "hi"      \n'


def test_tab_buffer_wraps_at_80_columns() -> None:
    buffer = TabBuffer()
    for index in range(12):
        buffer.add(str(index))
    lines = buffer.text().splitlines()
    assert [len(line) for line in lines] == [80, 40]
    assert lines[1].split() == ["8", "9", "10", "11"]


# -- the shell ---------------------------------------------------------------------------------


def test_split_command_like_iocsh() -> None:
    assert split_command('dbLoadRecords("a.db","P=X:,Q=Y")') == ["dbLoadRecords", "a.db", "P=X:,Q=Y"]
    assert split_command("dbLoadRecords a.db P=X:") == ["dbLoadRecords", "a.db", "P=X:"]
    assert split_command("echo \"a b\" c\\ d 'e'") == ["echo", "a b", "c d", "e"]
    assert split_command('epicsEnvSet("E","")') == ["epicsEnvSet", "E", ""]
    with pytest.raises(ValueError, match="Unbalanced quote"):
        split_command('echo "a')


@pytest.fixture
def ioc_folder(tmp_path: Path) -> Path:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "test.db").write_text(
        'record(ao, "$(P)ao") { field(VAL, "1.5") field(DRVH, "10") }\n'
        'record(calc, "$(P)calc") { field(INPA, "$(P)ao CP") field(CALC, "A*2+1") }\n'
        'record(stringout, "$(P)so") { field(VAL, "hello") }\n'
    )
    (tmp_path / "st.cmd").write_text(
        "#!../../bin/linux-x86_64/demo\n"
        "#- not echoed\n"
        'epicsEnvSet("PFX", "T:")\n'
        'epicsEnvSet("EPICS_CA_SERVER_PORT", "5999")\n'
        'cd "db"\n'
        'dbLoadDatabase("../dbd/missing.dbd")\n'
        "demo_registerRecordDeviceDriver(pdbbase)\n"
        'dbLoadRecords("test.db", "P=$(PFX)")\n'
        "iocInit\n"
        "dbl\n"
    )
    return tmp_path


def run_shell(folder: Path, console: str) -> tuple[str, dict[str, str], IocShell]:
    out = io.StringIO()
    environ: dict[str, str] = {}
    shell = IocShell(Database(), LocalFiles(str(folder)), out=out, hostname="ioc1", environ=environ)
    assert shell.run_script("st.cmd")
    shell.interact(io.StringIO(console))
    return out.getvalue(), environ, shell


def test_startup_script_and_console(ioc_folder: Path) -> None:
    console = (
        "dbgf T:calc\n"
        "dbpf T:ao 4\n"
        "dbgf T:calc\n"
        "dbpf T:ao 99\n"
        "dbgf T:so\n"
        "dbgf T:nope\n"
        "xyz 1 2\n"
        "echo hello world\n"
        "dbLoadRecords test.db\n"
        "exit\n"
        "echo never\n"
    )
    output, environ, shell = run_shell(ioc_folder, console)
    assert environ == {"PFX": "T:", "EPICS_CA_SERVER_PORT": "5999"}
    lines = output.splitlines()
    assert lines[0] == "#!../../bin/linux-x86_64/demo"
    assert "#- not echoed" not in output
    assert 'dbLoadRecords("test.db", "P=$(PFX)")' in lines
    assert any(line.startswith("ERROR: dbLoadDatabase: can't open file") for line in lines)
    assert "iocRun: All initialization complete" in lines
    after_dbl = lines[lines.index("dbl") + 1 : lines.index("dbl") + 4]
    assert after_dbl == ["T:ao", "T:calc", "T:so"]
    console_text = output.split("iocRun: All initialization complete\n", 1)[1]
    prompts = console_text.split("ioc1> ")
    assert prompts[1] == "DBF_DOUBLE:         0         \n"  # calc is UDF (0) before any put
    assert prompts[2] == "DBF_DOUBLE:         4         \n"
    assert prompts[3] == "DBF_DOUBLE:         9         \n"
    assert prompts[4] == "DBF_DOUBLE:         10        \n"  # clamped by DRVH
    assert prompts[5] == 'DBF_STRING:         "hello"   \n'
    assert prompts[6] == "PV 'T:nope' not found\n"
    assert prompts[7] == "Command xyz not found.\n"
    assert prompts[8] == "hello world\n"
    assert prompts[9] == "dbLoadRecords: ERROR: Records cannot be loaded after iocInit!\n"
    assert len(prompts) == 11 and prompts[10] == ""  # exit: no further output
    assert shell.running


def test_commands_before_iocinit_and_help() -> None:
    out = io.StringIO()
    shell = IocShell(Database(), LocalFiles("."), out=out, environ={})
    shell.execute("dbgf X")
    shell.execute("help db*")
    shell.execute("iocInit")
    shell.execute("iocInit")
    text = out.getvalue()
    assert text.startswith("dbgf only works after iocInit\n")
    assert "dbgf 'record name'\n" in text and "dbpf 'record name' 'value'\n" in text
    assert text.count("iocRun: All initialization complete") == 1
    assert text.endswith("iocInit can only be called once\n")
    assert shell.prompt == "epics> "
