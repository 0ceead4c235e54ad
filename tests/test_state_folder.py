"""The state folder is the caller's alone: a folder another user owns or can write into is refused
before anything is written, and secrets are never written through a link planted beside them."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from cnnsql.core import safefs
from cnnsql.core.errors import CnnsqlError
from conftest import REPO, traversable_tmpdir


def test_a_secret_is_never_written_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    link = tmp_path / "pgpass"
    link.symlink_to(victim)
    safefs.write_private(link, "secret\n", 0o600)
    assert victim.read_text() == "untouched\n"
    st = os.lstat(link)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and link.read_text() == "secret\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


def test_append_and_folders_refuse_links(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "log").symlink_to(target / "file")
    with pytest.raises(CnnsqlError, match="cannot open .* safely"):
        safefs.open_append(tmp_path / "log")
    assert not (target / "file").exists()
    (tmp_path / "run").symlink_to(target)
    mode = stat.S_IMODE(target.stat().st_mode)
    with pytest.raises(CnnsqlError, match="not a folder of its own"):
        safefs.private_dir(tmp_path / "run", 0o700)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_folders_others_can_write_or_own_are_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(CnnsqlError, match="writable by other users"):
        safefs.check_private_dir(open_dir)
    with pytest.raises(CnnsqlError, match="which other users can write into"):
        safefs.check_private_dir(open_dir / "state")  # a folder that does not exist yet: its parents count
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot replace what the caller owns in it
    safefs.check_private_dir(sticky / "state")
    (tmp_path / "link").symlink_to(tmp_path / "sticky")
    with pytest.raises(CnnsqlError, match="symbolic link"):
        safefs.check_private_dir(tmp_path / "link")
    own = tmp_path / "mine"
    own.mkdir()
    os.chmod(own, 0o700)
    safefs.check_private_dir(own)
    if os.geteuid() == 0:
        other = tmp_path / "theirs"
        other.mkdir()
        os.chown(other, 65534, 65534)
        with pytest.raises(CnnsqlError, match="belongs to another user"):
            safefs.check_private_dir(other)
        with pytest.raises(CnnsqlError, match="belongs to another user"):
            safefs.check_private_dir(other / "state")


@pytest.mark.integration
def test_a_planted_state_folder_gets_no_password():
    """The attack: another user creates the state folder first, world-writable, with the secrets'
    names linked to files of theirs. `cnnsql db start` refuses in one line and writes nothing."""
    base = traversable_tmpdir("cnnsql-planted-")
    try:
        home = base / "state"
        (home / "pg").mkdir(parents=True)
        os.chmod(home, 0o777)
        os.chmod(home / "pg", 0o777)
        loot = base / "loot"
        loot.mkdir()
        for name in ("initdb.pw", "pgpass", "port"):
            (loot / name).write_text("")
            (home / "pg" / name).symlink_to(loot / name)
        proc = subprocess.run([sys.executable, "-m", "cnnsql", "db", "start"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "CNNSQL_HOME": str(home)})
        err = [l for l in proc.stderr.splitlines() if l.startswith("cnnsql: error:")]
        assert proc.returncode != 0 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "writable by other users" in err[0] and str(home) in err[0] and "CNNSQL_HOME" in err[0]
        assert all((loot / n).read_text() == "" for n in ("initdb.pw", "pgpass", "port"))
        assert not (home / "pg" / "data" / "PG_VERSION").exists()
    finally:
        subprocess.run(["rm", "-rf", str(base)])


@pytest.mark.integration
def test_the_server_inherits_none_of_the_callers_environment():
    """A token in the caller's environment never reaches the server (nor PL/Python's os.environ there)."""
    from cnnsql.db.pgcluster import PrivateCluster

    base = traversable_tmpdir("cnnsql-env-")
    home = base / "state"
    try:
        env = {**os.environ, "CNNSQL_HOME": str(home), "CNNSQL_TEST_TOKEN": "s3cr3t-token-value"}
        proc = subprocess.run([sys.executable, "-m", "cnnsql", "db", "start"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        pid = PrivateCluster(home)._postmaster_pid()
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not any(b"s3cr3t-token-value" in e for e in environ)
        assert {e.split(b"=", 1)[0] for e in environ if e} <= {b"PATH", b"LC_ALL", b"LANG", b"HOME", b"TZ", b"PGDATA",
                                                               b"PG_GRANDPARENT_PID", b"PGSYSCONFDIR", b"PGLOCALEDIR", b"PWD"}
    finally:
        PrivateCluster(home).stop()
        subprocess.run(["rm", "-rf", str(base)])
