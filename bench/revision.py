"""The source trees a benchmark runs: this checkout, and a git revision built beside it.

`python bench/run.py --against REV` benches two servers side by side. The new one is the
checkout bench/run.py lives in, served by the interpreter that runs it (its venv must have
that checkout installed, `pip install -e ./clients -e '.[bench]'`). The previous one is REV, checked out
with `git worktree add` and installed in a fresh venv of its own (`pip install -e`, so that
each revision gets the dependencies its own pyproject.toml names: psycopg2 or psycopg 3).

The bench process never imports either server's code: what it needs to know about a tree
(which settings it has, what they come to, whether `serve` takes --workers) it asks that
tree's own interpreter in a subprocess, so the two revisions may differ in anything.

By default the worktree and its venv live in the run's temporary directory and are removed
with it. With `--cache-build` they are kept under the system's temporary directory, keyed by
the revision's commit, and reused by the next run (`git worktree list` shows them; delete
with `git worktree remove --force DIR` and `rm -rf` of its parent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_TIMEOUT_S = 900.0
QUERY_TIMEOUT_S = 60.0

# Run by a tree's own interpreter: its settings' names and, with `values`, what they come to
# in the environment it is given (validated, as `adaccounts serve` would).
_SETTINGS_SCRIPT = """
import json, sys
from adaccounts_server import config
answer = {"package": config.__file__, "fields": sorted(config.Settings.model_fields)}
if sys.argv[1:] == ["values"]:
    settings = config.load_settings()
    answer["values"] = {k: None if v is None else str(v) for k, v in settings.model_dump().items()}
    pool_size = getattr(settings, "pool_size", None)  # DB_POOL_SIZE, else GRPC_THREADS (psycopg2 revisions)
    if not isinstance(pool_size, int):
        pool_size = getattr(settings, "DB_POOL_SIZE", None)
    answer["pool_size"] = pool_size if isinstance(pool_size, int) else None
print(json.dumps(answer))
"""


@dataclass
class Tree:
    """A source tree and the interpreter whose venv has it installed."""

    label: str  # "working tree", "HEAD (9f0e021ab)"
    root: Path
    python: Path
    isolated: bool = False  # a built revision: it gets no PYTHONPATH from the caller
    _fields: frozenset[str] | None = field(default=None, repr=False)

    def cli(self, *args: str) -> list[str]:
        """`<venv>/bin/adaccounts ARGS...`, else `python -m adaccounts_server.cli ARGS...`.

        The script only when it runs this very interpreter (a system Python's bin/ may hold
        another install's `adaccounts`).
        """
        script = self.python.parent / "adaccounts"
        with contextlib.suppress(OSError, IndexError):
            shebang = script.read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
            if Path(shebang).resolve() == self.python.resolve():
                return [str(script), *args]
        return [str(self.python), "-m", "adaccounts_server.cli", *args]

    @property
    def fields(self) -> frozenset[str]:
        """The names of this tree's settings (its config.Settings)."""
        if self._fields is None:
            answer = self._query([])
            package = Path(answer["package"]).resolve()
            if not package.is_relative_to(self.root.resolve()):
                raise RuntimeError(
                    f"{self.label}: {self.python} imports adaccounts_server from {package.parent.parent}, not from "
                    f"{self.root}: run the benchmark with a venv that has this checkout installed "
                    f"(pip install -e '{self.root}/clients' -e '{self.root}[bench]')"
                )
            self._fields = frozenset(answer["fields"])
        return self._fields

    def settings(self, env: dict[str, str], workdir: Path) -> tuple[dict[str, str | None], int | None]:
        """The settings this tree's server would run with in `env`, and its pool size if it says."""
        answer = self._query(["values"], env, workdir)
        return answer["values"], answer["pool_size"]

    def serve_help(self, workdir: Path) -> str:
        result = subprocess.run(
            self.cli("serve", "--help"),
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
        return result.stdout

    def _query(self, args: list[str], env: dict[str, str] | None = None, workdir: Path | None = None) -> dict:  # type: ignore[type-arg]
        result = subprocess.run(
            [str(self.python), "-c", _SETTINGS_SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir or tempfile.gettempdir(),  # never a stray .env file
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.label}: reading its settings failed:\n{result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def working_tree(root: Path) -> Tree:
    """This checkout, served by the interpreter running the benchmark."""
    return Tree(label=f"working tree ({describe_checkout(root)})", root=root, python=Path(sys.executable))


def describe_checkout(root: Path) -> str:
    """'HEAD 9f0e021ab' or 'HEAD 9f0e021ab + uncommitted changes' (to what a server runs)."""
    try:
        head = _git(root, "rev-parse", "--short=9", "HEAD").strip()
        changed = _git(root, "status", "--porcelain", "--", "server", "clients", "migrations", "pyproject.toml")
    except GitError:
        return "not a git checkout"
    return f"HEAD {head}" + (" + uncommitted changes" if changed.strip() else "")


def resolve(root: Path, revision: str) -> str:
    """The full commit id of `revision`; ValueError when git knows no such commit."""
    try:
        return _git(root, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").strip()
    except GitError:
        raise ValueError(f"--against {revision}: no such commit in {root}") from None


@contextlib.contextmanager
def built_revision(root: Path, revision: str, workdir: Path, cache: bool, log: Callable[[str], None]) -> Iterator[Tree]:
    """REV checked out in a git worktree and installed in a venv of its own, removed on the way out.

    With `cache`, both stay in the temporary directory keyed by the commit and are reused.
    """
    sha = resolve(root, revision)
    label = f"{revision} ({sha[:9]})" if not sha.startswith(revision) else sha[:9]
    # Cached: where the next run finds it; else inside the run's directory, deleted with it.
    base = Path(tempfile.gettempdir()) / f"adaccounts-bench-{sha[:12]}" if cache else workdir / f"rev-{sha[:12]}"
    tree, venv = base / "tree", base / "venv"
    python = venv / "bin" / "python"
    done = base / "built"  # written last: a build cut short is never reused
    built = Tree(label=label, root=tree, python=python, isolated=True)
    try:
        with _lock(base):
            if cache and done.exists() and done.read_text() == sha and python.exists():
                log(f"reusing the build of {label} in {base}")
            else:
                _remove(root, base)
                base.mkdir(parents=True)
                log(f"building {label}: git worktree in {tree}, venv in {venv} (pip install -e)")
                started = time.monotonic()
                _git(root, "worktree", "add", "--detach", "--force", str(tree), sha)
                _run([sys.executable, "-m", "venv", str(venv)], base / "venv.log")
                install = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-e", str(tree)]
                if (tree / "clients" / "pyproject.toml").exists():  # the server depends on the client
                    install[-2:-2] = ["-e", str(tree / "clients")]
                _run(install, base / "pip.log")
                done.write_text(sha)
                log(f"built {label} in {time.monotonic() - started:.0f} s")
        yield built
    finally:
        if not cache:
            _remove(root, base)


@contextlib.contextmanager
def _lock(base: Path) -> Iterator[None]:
    """One build of a revision at a time (two cached runs of the same commit wait for each other)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{base}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove(root: Path, base: Path) -> None:
    """The worktree (from git's list too) and the venv under `base`, whatever state they are in."""
    tree = base / "tree"
    if tree.exists():
        with contextlib.suppress(GitError):
            _git(root, "worktree", "remove", "--force", str(tree))
    shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(GitError):
        _git(root, "worktree", "prune")


class GitError(RuntimeError):
    pass


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def _run(command: list[str], log_file: Path) -> None:
    with log_file.open("wb") as log:
        result = subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT_S,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_USER")},
        )
    if result.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}):\n{tail}")
