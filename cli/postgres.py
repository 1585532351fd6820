"""Debian's PostgreSQL as a service of the local stack (cli/stack.py): the store of its Prefect and MLflow servers.

One cluster per workdir in `<workdir>/stack/postgres`, made by initdb on the first `up` and kept across `down` and
`up` (as their SQLite files were). It listens on 127.0.0.1 only and on no Unix socket, and its one role,
`stack.POSTGRES_USER`, signs in with a generated password kept in `<workdir>/stack/postgres-credentials.json`
(mode 0600): it never appears on a command line.

PostgreSQL refuses to run as root. Under root, initdb and the server run as Debian's `postgres` system user, which
owns the data folder and must be able to enter every folder above it. pytest's temp folders (and many home folders)
are mode 0700: a folder above the data folder that shuts that user out and belongs to the user running `up` is
opened for entering only (o+x: others may then open files in it by name, not list it); one that belongs to someone
else stops `up` with a StackError naming it. The server needs those folders only while it starts (it works from
inside its data folder), so a later `chmod` (pytest closes its temp root again on each start) does not disturb it.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

from alignpipe.cli import stack

DATABASES = ("prefect", "mlflow")
SYSTEM_USER = "postgres"  # Debian's account for the server; used only when `up` runs as root


def bin_dir() -> Path:
    """The newest installed PostgreSQL's programs: Debian puts each major version in /usr/lib/postgresql/<ver>/bin."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not found:
        raise stack.StackError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): `make postgres` "
                               "installs Debian's package (apt-get install postgresql)")
    return max(found, key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])


def _account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this process's own) unless this process is root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise stack.StackError(f"PostgreSQL will not run as root and there is no `{SYSTEM_USER}` user to run it as: "
                               "Debian's postgresql package makes one (`make postgres`)") from None


def _open_parents(folder: Path, account: pwd.struct_passwd) -> None:
    """Make every folder above `folder` enterable by `account`, where the folder is ours (see the module's doc)."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for parent in folder.parents:
        st = parent.stat()
        # Which of the mode's three x bits applies to the account: the owner's, else the group's, else others'
        bit = (stat.S_IXUSR if st.st_uid == account.pw_uid else stat.S_IXGRP if st.st_gid in groups
               else stat.S_IXOTH)
        if st.st_mode & bit:
            continue
        if st.st_uid != os.geteuid():
            raise stack.StackError(
                f"PostgreSQL runs as the `{account.pw_name}` user here (it refuses root), and that user cannot enter "
                f"{parent} (mode {stat.S_IMODE(st.st_mode):o}, not ours to change): `chmod o+x {parent}`, or choose "
                "a --workdir it can reach")
        os.chmod(parent, stat.S_IMODE(st.st_mode) | bit)


def _initdb(bin: Path, data: Path, password: str, account: pwd.struct_passwd | None) -> None:
    """Make the cluster in `data`: role stack.POSTGRES_USER with `password`, password sign-in only."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    pwfile = data.parent / "postgres-initdb-password"  # initdb reads it as the server's user: gone when it ends
    pwfile.unlink(missing_ok=True)
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    as_user = {}
    if account:
        for path in (data, pwfile):
            os.chown(path, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    cmd = [str(bin / "initdb"), "--pgdata", str(data), "--username", stack.POSTGRES_USER, "--pwfile", str(pwfile),
           "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-instructions"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=data,
                              stdin=subprocess.DEVNULL, **as_user)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise stack.StackError(f"initdb failed for {data}:\n{(done.stdout + done.stderr)[-2000:]}")


def start(root: Path, port: int, password: str) -> stack.Service:
    """PostgreSQL on HOST:`port` with its data in `root`/postgres (made first if missing, with `password`: see
    stack.postgres_credentials); not waited for (`wait`)."""
    bin, account = bin_dir(), _account()
    data = root.resolve() / "postgres"
    root.mkdir(parents=True, exist_ok=True)
    if account:
        _open_parents(data, account)
    if not (data / "PG_VERSION").is_file():
        _initdb(bin, data, password, account)
    # No Unix socket (Debian's default folder, /var/run/postgresql, is not ours); the port on the command line, so
    # the data folder holds no port of a past `up`.
    cmd = [str(bin / "postgres"), "-D", str(data), "-p", str(port), "-c", f"listen_addresses={stack.HOST}",
           "-c", "unix_socket_directories="]
    return stack._start("postgres", cmd, port, f"postgresql://{stack.HOST}:{port}", root / "logs", {},
                        user=account.pw_name if account else None, cwd=data)


def wait(svc: stack.Service, password: str, timeout: float = 240) -> None:
    """Return once the server `svc` takes connections and holds DATABASES (made here where missing)."""
    import psycopg2  # only here: the CLI's other commands never pay for importing it

    def connect():
        return psycopg2.connect(stack.postgres_url(svc.port, password, "postgres"), connect_timeout=2)

    def ready() -> bool:
        try:
            connect().close()
            return True
        except psycopg2.OperationalError as exc:  # not listening yet, or still starting up
            if "password authentication failed" in str(exc):
                raise stack.StackError(
                    f"the stack's PostgreSQL at {svc.url} refused the password in postgres-credentials.json (beside "
                    "its data folder): put the file that made the data folder back, or remove the data folder "
                    "(Prefect's and MLflow's data go with it)") from None
            return False

    stack._wait(svc, ready, timeout)
    conn = connect()
    conn.autocommit = True  # CREATE DATABASE runs outside a transaction
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
