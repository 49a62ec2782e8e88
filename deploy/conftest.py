"""Prints what deploy/test_deploy.py measured (image size, build time, SIGTERM to exit) after the run."""


def pytest_terminal_summary(terminalreporter):
    try:
        from test_deploy import MEASUREMENTS
    except ImportError:
        return
    if MEASUREMENTS:
        terminalreporter.write_sep("-", "deploy measurements")
        for key, value in MEASUREMENTS.items():
            terminalreporter.write_line("%s: %s" % (key, value))
