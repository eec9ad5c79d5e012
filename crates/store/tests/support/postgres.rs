//! A PostgreSQL server for the tests, and one fresh database per test.
//!
//! The server is the one `AISHELL_TEST_DATABASE_URL` names (CI starts it
//! with .ci/postgres-start), or else a throwaway cluster this process starts
//! on first use: `initdb` into a temp dir, `postgres` on a free loopback
//! port with trust auth, both run as the `postgres` user when the tests run
//! as root (PostgreSQL refuses to run as root). The cluster is stopped and
//! its directory deleted when the test process exits, and the server dies
//! with the process if it is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// Names the server to use instead of starting one: a URL whose user may
/// create and drop databases (its database part is replaced per test).
pub const URL_VAR: &str = "AISHELL_TEST_DATABASE_URL";

/// A database of its own for one test, dropped (with any connection still
/// open to it) when this goes out of scope.
pub struct TestDatabase {
    /// `postgres://…/<this test's database>`.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let admin_url = server_url().to_string();
        let name = format!(
            "aishell_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test server {admin_url}: {e}"));
        // A locale whose order is not byte order (ICU's root: a < A < b <
        // B), so the tests catch any ordering the schema leaves to the
        // locale; a plain database where the server has no ICU.
        let icu = format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' \
             LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'"
        );
        if sqlx::query(&icu).execute(&mut admin).await.is_err() {
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        }
        admin.close().await.ok();
        TestDatabase {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: use a thread of
        // its own with a runtime of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

/// `url` naming database `name` instead of its own (query kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{name}{query}")
}

/// The URL of the server the tests use (starting it on first call).
fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let cluster = Cluster::start();
            let url = cluster.url();
            *CLUSTER.lock().unwrap() = Some(cluster);
            // SAFETY: registers a plain `extern "C"` function, once.
            unsafe { libc::atexit(stop_cluster_at_exit) };
            url
        }
    })
}

static CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);

extern "C" fn stop_cluster_at_exit() {
    let cluster = CLUSTER.lock().map(|mut c| c.take()).unwrap_or(None);
    drop(cluster);
}

/// A throwaway PostgreSQL cluster: stopped and deleted on drop.
struct Cluster {
    /// Deleted (after the server stopped) when the cluster is dropped.
    _dir: tempfile::TempDir,
    server: Child,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let bin = bin_dir();
        let owner = Owner::for_server();
        let dir = tempfile::Builder::new()
            .prefix("aishell-pg-")
            .tempdir()
            .expect("temp dir for the cluster");
        owner.take(dir.path());
        let data = dir.path().join("data");
        let log = dir.path().join("initdb.log");
        let status = owner
            .command(&bin.join("initdb"), dir.path())
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--no-sync", "--pgdata"])
            .arg(&data)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .status()
            .expect("running initdb");
        assert!(status.success(), "initdb failed: {}", read(&log));

        // A port just seen free; another process taking it in between makes
        // the server fail to start, and the next attempt picks another.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("server-{port}.log"));
            let mut server = owner.command(&bin.join("postgres"), dir.path());
            server
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-k")
                .arg(dir.path())
                // Throwaway data: durability buys nothing here.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
                .stdin(Stdio::null());
            let log_file = std::fs::File::create(&log).unwrap();
            server
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file);
            let mut server = spawn_tied_to_process(server);
            if wait_until_ready(&bin, port, &mut server) {
                return Cluster {
                    _dir: dir,
                    server,
                    port,
                };
            }
            let _ = server.kill();
            let _ = server.wait();
            last_log = read(&log);
        }
        panic!("the PostgreSQL server did not start:\n{last_log}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
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
        // The `_dir` field (a TempDir) deletes the cluster's files next.
    }
}

/// Start `command` so that the server gets SIGINT if this process dies
/// without stopping it. The parent-death signal fires when the *thread*
/// that forked exits, so the fork happens on a thread that never does.
fn spawn_tied_to_process(mut command: Command) -> Child {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postgres-parent".into())
        .spawn(move || {
            sender.send(command.spawn()).unwrap();
            loop {
                std::thread::park();
            }
        })
        .expect("thread to start the server");
    receiver
        .recv()
        .unwrap()
        .expect("starting the PostgreSQL server")
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Where the server's programs are: `AISHELL_PG_BIN`, else the newest
/// /usr/lib/postgresql/<version>/bin (Debian), else `pg_config --bindir`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AISHELL_PG_BIN") {
        return dir.into();
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
        return bin;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL not found: set AISHELL_PG_BIN or AISHELL_TEST_DATABASE_URL");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The user the cluster runs as: `postgres` when we are root, else us.
pub struct Owner {
    ids: Option<(u32, u32)>,
}

impl Owner {
    pub fn for_server() -> Owner {
        // SAFETY: plain libc calls; getpwnam's result is read at once, and
        // the tests look up no other user concurrently.
        let ids = unsafe {
            if libc::geteuid() != 0 {
                None
            } else {
                let pw = libc::getpwnam(c"postgres".as_ptr());
                assert!(
                    !pw.is_null(),
                    "running as root needs a `postgres` user to run the server as"
                );
                Some(((*pw).pw_uid, (*pw).pw_gid))
            }
        };
        Owner { ids }
    }

    /// Hand `dir` to the server's user.
    pub fn take(&self, dir: &Path) {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown the cluster dir");
        }
    }

    /// `program` run as the server's user, from `cwd` (a directory that
    /// user can enter).
    pub fn command(&self, program: &Path, cwd: &Path) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        command.current_dir(cwd);
        if let Some((uid, gid)) = self.ids {
            command.uid(uid).gid(gid).env("HOME", cwd);
        }
        command
    }
}
