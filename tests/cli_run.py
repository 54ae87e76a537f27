"""Run the ``wsi-ircr`` command line in this process for tests: exit status and stderr lines."""

from __future__ import annotations

import logging


def run_cli(*args, capfd, caplog=None) -> tuple[int, list[str]]:
    """``wsi_ircr.cli.main(args)``; (exit status, stderr lines read at the file-descriptor
    level, plus warnings logged during the command when ``caplog`` is given)."""
    from wsi_ircr.cli import main

    capfd.readouterr()
    if caplog is not None:
        caplog.clear()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    lines = capfd.readouterr().err.splitlines()
    if caplog is not None:
        lines += [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return code, lines


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``wsi_ircr.cli.main(argv)``; (exit status, stdout, stderr) of this call as ``capsys`` captured them."""
    from wsi_ircr.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
