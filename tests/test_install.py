"""Install hints name a command that works in the install anomnet runs from (anomnet is on no package index).

The commands are run for real by the slow install tests: the wheel's in tests/test_runtime_install.py, the
checkout's in tests/test_readme.py.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from anomnet import install
from anomnet.install import install_command, pip_command

REPO = Path(__file__).resolve().parents[1]
PYTHON = shlex.quote(sys.executable)


class _Dist:
    def __init__(self, direct_url: dict[str, object] | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        assert name == "direct_url.json"
        return None if self.direct_url is None else json.dumps(self.direct_url)


def _installed(monkeypatch: pytest.MonkeyPatch, direct_url: dict[str, object] | None) -> None:
    """As if this anomnet were installed into site-packages with that direct_url.json (None: from an index)."""
    monkeypatch.setattr(install, "_checkout", lambda: None)
    monkeypatch.setattr(install.metadata, "distribution", lambda name: _Dist(direct_url))


def test_a_checkout_gets_an_editable_install_of_itself_by_this_python() -> None:
    assert install_command("serve") == f"{PYTHON} -m pip install -e '{REPO}[serve]'"


def test_a_wheel_install_gets_that_wheel_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "file:///opt/line%20pc/anomnet-0.1.0-py3-none-any.whl"
    _installed(monkeypatch, {"url": url, "archive_info": {"hashes": {}}})
    command = install_command("runtime")
    assert command == f"{PYTHON} -m pip install '/opt/line pc/anomnet-0.1.0-py3-none-any.whl[runtime]'"
    assert shlex.split(command)[-1] == "/opt/line pc/anomnet-0.1.0-py3-none-any.whl[runtime]"  # one argument


def test_a_folder_install_gets_that_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, {"url": "file:///srv/anomnet", "dir_info": {}})
    assert install_command("ray") == f"{PYTHON} -m pip install '/srv/anomnet[ray]'"


@pytest.mark.parametrize("direct_url", [None, {"url": "https://example.org/anomnet.tar.gz", "archive_info": {}}])
def test_an_index_install_gets_the_package_name(monkeypatch: pytest.MonkeyPatch, direct_url: dict | None) -> None:
    _installed(monkeypatch, direct_url)
    assert install_command("export") == f"{PYTHON} -m pip install 'anomnet[export]'"


def test_a_plain_package_is_installed_by_this_python() -> None:
    assert pip_command("elpv-dataset") == f"{PYTHON} -m pip install elpv-dataset"


def test_no_message_spells_out_an_install_command_of_its_own() -> None:
    """Every hint goes through anomnet.install, so each prints the command for the install it runs from."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "src" / "anomnet").rglob("*.py"))
        if path.name != "install.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"pip install [^{]", line)
    ]
    assert offenders == []


def test_the_serve_help_carries_the_checkout_command(capsys: pytest.CaptureFixture[str]) -> None:
    from anomnet.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    squeeze = lambda text: "".join(text.split())  # noqa: E731 - argparse wraps the description anywhere
    assert squeeze(install_command("serve")) in squeeze(capsys.readouterr().out)
