"""One command-line convention (issue 47): no abbreviated options, one error prefix, ``--no-progress``
on every command, the same ``--repeats``/``--warmup`` defaults, options checked before data is read,
a bad or busy ``demo --port`` in one line, and a one-line hint when a busy machine makes ToMe slower."""
from __future__ import annotations

import argparse
import os
import socket

import pytest

from visiontools.cli import build_parser, main
from visiontools.defaults import REPEATS, WARMUP


def run_cli(capsys, argv):
    """``visiontools argv`` in-process: (exit status, stdout, stderr lines)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def one_line_error(capsys, argv, *needles) -> str:
    """Exit status 2 and one stderr line, ``visiontools: error: ...``, holding every needle."""
    rc, _, lines = run_cli(capsys, argv)
    assert rc == 2 and len(lines) == 1, (rc, lines)
    assert lines[0].startswith("visiontools: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def command_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser (``("eval",)``, ``("bench", "vit")``, ...), its options loaded."""
    out = {}

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[path + (name,)] = sub.load()
                    walk(sub, path + (name,))

    walk(build_parser(), ())
    return out


def test_every_parser_refuses_abbreviations_and_shares_the_options():
    parsers = command_parsers()
    assert {("train",), ("eval",), ("demo",), ("export",), ("video",), ("bench", "vit"), ("bench", "sd"),
            ("bench", "dit"), ("bench", "hyena"), ("bench", "mixers"), ("bench", "onnx"),
            ("bench", "all"), ("bench", "reversible")} <= set(parsers)
    timed = 0
    for path, p in parsers.items():
        assert p.allow_abbrev is False, path
        if path == ("bench",):  # only lists the targets
            continue
        assert "--no-progress" in p._option_string_actions, path
        opts = p._option_string_actions
        if "--repeats" in opts or "--warmup" in opts:
            timed += 1
            assert (opts["--repeats"].default, opts["--warmup"].default) == (REPEATS, WARMUP), path
    assert timed == 9  # eval and every bench target


@pytest.mark.parametrize("argv", [["train", "--r", "8"], ["train", "--r"], ["train", "--res"]])
def test_train_r_is_not_read_as_resume(capsys, argv):
    one_line_error(capsys, argv, f"unrecognized arguments: {' '.join(argv[1:])}", "see visiontools train --help")


def test_an_abbreviated_bench_option_is_refused(capsys):
    one_line_error(capsys, ["bench", "--repeat", "3"], "unrecognized arguments: --repeat 3",
                   "see visiontools bench vit --help")


def test_a_command_parser_error_has_the_one_prefix(capsys):
    one_line_error(capsys, ["eval", "--r", "x"], "argument --r/--tome-r: not an r setting: 'x'",
                   "see visiontools eval --help")
    one_line_error(capsys, ["bench", "hyena", "--grids", "0x"], "see visiontools bench hyena --help")


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_demo_bad_port_is_one_line(capsys, port):
    one_line_error(capsys, ["demo", "--port", port], f"'{port}' is not a TCP port", "from 1 to 65535")


def test_demo_busy_port_is_one_line_before_any_model_loads(capsys, monkeypatch):
    import visiontools.demos.app as app

    def no_build(*a, **k):
        raise AssertionError("the demo was built although its port is busy")

    monkeypatch.setattr(app, "build_demo", no_build)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(capsys, ["demo", "--host", "127.0.0.1", "--port", str(port)],
                       f"cannot serve on 127.0.0.1:{port}", "--port")


def test_a_port_left_in_time_wait_by_a_stopped_demo_is_free():
    """A demo restarted on its port: the old server's connections wait in TIME_WAIT there, which the new
    server (it sets SO_REUSEADDR, as uvicorn does) may bind; the port check must not refuse it."""
    import time

    from visiontools.demos.app import check_port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()      # the server side closes first: its end of the connection goes to TIME_WAIT
    server.close()
    client.close()
    time.sleep(0.2)
    with pytest.raises(OSError), socket.socket() as plain:  # a bind without SO_REUSEADDR is refused
        plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_python_m_demos_app_is_the_demo_command_with_its_one_line_errors(capsys):
    """``python -m visiontools.demos.app`` on a busy port: the CLI's one line and status 2, no traceback."""
    import visiontools.demos.app as app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert app.main(["--host", "127.0.0.1", "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"visiontools: error: cannot serve on 127.0.0.1:{port} "), lines
    assert "pass another --port N" in lines[0], lines


@pytest.mark.parametrize("argv, needle", [
    (["--method", "foo"], "unknown method 'foo'"),
    (["--budget", "2"], "in (0, 1]; got 2"),
    (["--checkpoint", "conformer_cifar10", "--r", "4", "--method", "pitome"], "grid operations"),
])
def test_eval_options_are_checked_before_data_is_read(capsys, monkeypatch, argv, needle):
    import visiontools.evaluate as ev

    def no_data(*a, **k):
        raise AssertionError("data was read before the options were checked")

    monkeypatch.setattr(ev, "load_eval_data", no_data)
    one_line_error(capsys, ["eval", *argv, "--per-class", "1", "--no-progress"], needle)


def _busy(monkeypatch, load: float):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


def test_busy_machine_note(monkeypatch):
    from visiontools.timing import busy_machine_note, cpu_threads

    _busy(monkeypatch, cpu_threads() + 3.0)
    note = busy_machine_note([1.4, 0.62])
    assert note.startswith("note: ToMe measured slower (0.62x)") and "--threads 1" in note, note
    assert f"load average {cpu_threads() + 3.0:.1f} > its {cpu_threads()} CPU threads" in note
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert "rerun with --threads 1, or on an idle machine," in busy_machine_note([0.62])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert "this run had --threads 1 already: rerun on an idle machine" in busy_machine_note([0.62])
    assert busy_machine_note([1.4, 1.1]) is None  # not slower
    assert busy_machine_note([0.62], "meta") is None  # not a CPU timing
    _busy(monkeypatch, cpu_threads() - 0.5)
    assert busy_machine_note([0.62]) is None  # not busy


def test_bench_says_when_a_busy_machine_makes_tome_slower(capsys, monkeypatch):
    import visiontools.timing as timing

    def slower_tome(fns, repeats, warmup, **kw):  # as measured on a crowded machine
        return {n: [0.1 if n.startswith("timm") else 0.2] * repeats for n in fns}

    monkeypatch.setattr(timing, "interleaved_times", slower_tome)
    argv = ["bench", "--model", "cifar10_vit", "--batch-size", "2", "--r", "8", "--threads", "1", "--no-progress"]
    _busy(monkeypatch, timing.cpu_threads() + 5.0)
    rc, out, _ = run_cli(capsys, argv)
    notes = [line for line in out.splitlines() if line.startswith("note: ToMe measured slower (0.50x)")]
    assert rc == 0 and len(notes) == 1 and "--threads 1" in notes[0], out
    _busy(monkeypatch, 0.0)
    rc, out, _ = run_cli(capsys, argv)
    assert rc == 0 and "note:" not in out, out


def test_every_argument_parser_in_the_source_refuses_abbreviations():
    """Scripts and ``python -m`` entry points too: each ``argparse.ArgumentParser(...)`` call says
    ``allow_abbrev=False`` (the CLI's parsers get it from ``visiontools.cli._Parser``)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in [*root.glob("scripts/*.py"), *root.glob("visiontools/**/*.py"), *root.glob("demos/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
                ok = any(k.arg == "allow_abbrev" and getattr(k.value, "value", None) is False for k in node.keywords)
                calls.append((path.relative_to(root).as_posix(), node.lineno, ok))
    assert len(calls) >= 3, calls
    assert all(ok for *_, ok in calls), [c for c in calls if not c[2]]
