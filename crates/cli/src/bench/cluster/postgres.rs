//! A throwaway PostgreSQL server for `aishell bench cluster`: `initdb` into
//! a temp dir, `postgres` on a free loopback port with trust auth, both run
//! as the `postgres` user when the bench runs as root (PostgreSQL refuses to
//! run as root). The same commands as .ci/postgres-start. Stopped and its
//! directory deleted on drop; it gets SIGINT (fast shutdown) if the bench
//! dies without dropping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running throwaway server.
pub struct Postgres {
    server: Child,
    dir: RemovedOnDrop,
    pub port: u16,
    /// `postgres --version`, e.g. "postgres (PostgreSQL) 15.18 (Debian …)".
    pub version: String,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let owner = Owner::for_server()?;
        let dir = RemovedOnDrop(std::env::temp_dir().join(format!(
            "aishell-bench-pg-{}-{:08x}",
            std::process::id(),
            uuid::Uuid::new_v4().as_u128() as u32
        )));
        std::fs::create_dir(&dir.0)
            .with_context(|| format!("BENCH_POSTGRES_FAILED: cannot create {}", dir.0.display()))?;
        owner.take(&dir.0)?;
        let data = dir.0.join("data");
        let log = dir.0.join("initdb.log");
        let status = owner
            .command(&bin.join("initdb"), &dir.0)
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--no-sync", "--pgdata"])
            .arg(&data)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.0.join("initdb.err"))?)
            .status()
            .context("BENCH_POSTGRES_FAILED: cannot run initdb")?;
        if !status.success() {
            bail!(
                "BENCH_POSTGRES_FAILED: initdb failed: {}{}",
                read(&log),
                read(&dir.0.join("initdb.err"))
            );
        }
        let version = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        // A port just seen free; another process taking it in between makes
        // the server fail to start, and the next attempt picks another.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let log = dir.0.join(format!("server-{port}.log"));
            let log_file = std::fs::File::create(&log)?;
            let mut cmd = owner.command(&bin.join("postgres"), &dir.0);
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-k")
                .arg(&dir.0)
                // As durable as the SQLite store it is compared with (WAL,
                // synchronous=NORMAL: commits do not wait for the disk),
                // unlike the tests' fsync=off.
                .args(["-c", "synchronous_commit=off", "-c", "max_connections=300"])
                // Counts every statement (bench/cluster/statements.rs).
                .args(["-c", "shared_preload_libraries=pg_stat_statements"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file);
            // SAFETY: setpgid and prctl only, between fork and exec.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    // Its own group: a terminal's Ctrl-C reaches the bench,
                    // which stops the gateways before the database.
                    libc::setpgid(0, 0);
                    // The bench killed outright takes its server with it
                    // (SIGINT: fast shutdown). Set after the uid change,
                    // which would clear it.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                    Ok(())
                });
            }
            let mut server = cmd
                .spawn()
                .context("BENCH_POSTGRES_FAILED: cannot start postgres")?;
            if wait_until_ready(&bin, port, &mut server) {
                return Ok(Postgres {
                    server,
                    dir,
                    port,
                    version,
                });
            }
            let _ = server.kill();
            let _ = server.wait();
            last_log = read(&log);
        }
        bail!("BENCH_POSTGRES_FAILED: the PostgreSQL server did not start:\n{last_log}")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (disconnect everyone, no checkpoint wait).
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.server.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.server.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.server.kill();
                    let _ = self.server.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // The `dir` field deletes the cluster's files next.
    }
}

/// A directory deleted (with everything in it) on drop.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Wait until the server accepts connections (or exits, or 60 s pass).
fn wait_until_ready(bin: &Path, port: u16, server: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = server.try_wait() {
            return false;
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free loopback port")?
        .port())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Where the server's programs are: `AISHELL_PG_BIN`, else the newest
/// /usr/lib/postgresql/<version>/bin (Debian), else `pg_config --bindir`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AISHELL_PG_BIN") {
        return Ok(dir.into());
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .max();
    if let Some((_, bin)) = debian {
        return Ok(bin);
    }
    let missing = "BENCH_POSTGRES_MISSING: PostgreSQL's programs (initdb, postgres) were not found; install PostgreSQL (Debian: apt-get install postgresql), set AISHELL_PG_BIN to their directory, or pass --database-url";
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context(missing)?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !dir.join("initdb").is_file() {
        bail!(missing);
    }
    Ok(dir)
}

/// The user the server runs as: `postgres` when we are root, else us.
struct Owner {
    ids: Option<(u32, u32)>,
}

impl Owner {
    fn for_server() -> anyhow::Result<Owner> {
        // SAFETY: plain libc calls; getpwnam's result is read at once, and
        // nothing else in the bench looks up users.
        let ids = unsafe {
            if libc::geteuid() != 0 {
                None
            } else {
                let pw = libc::getpwnam(c"postgres".as_ptr());
                if pw.is_null() {
                    bail!(
                        "BENCH_POSTGRES_FAILED: PostgreSQL refuses to run as root and there is no `postgres` user to run it as; create one, run the bench as another user, or pass --database-url"
                    );
                }
                Some(((*pw).pw_uid, (*pw).pw_gid))
            }
        };
        Ok(Owner { ids })
    }

    /// Hand `dir` to the server's user.
    fn take(&self, dir: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).with_context(|| {
                format!("BENCH_POSTGRES_FAILED: cannot chown {}", dir.display())
            })?;
        }
        Ok(())
    }

    /// `program` run as the server's user, from `cwd` (a directory that
    /// user can enter).
    fn command(&self, program: &Path, cwd: &Path) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        command.current_dir(cwd);
        if let Some((uid, gid)) = self.ids {
            command.uid(uid).gid(gid).env("HOME", cwd);
        }
        command
    }
}
