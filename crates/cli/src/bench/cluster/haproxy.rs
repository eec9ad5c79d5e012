//! HAProxy in front of the bench's gateways, with the shipped
//! `deploy/haproxy/haproxy.cfg` (embedded at build time) so that the bench
//! measures the configuration docs/cluster.md tells operators to use.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The configuration shipped in the repository.
const SHIPPED: &str = include_str!("../../../../../deploy/haproxy/haproxy.cfg");

/// A running HAProxy, stopped on drop.
pub struct Haproxy {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// `haproxy -v`'s first line.
    pub version: String,
}

/// The shipped configuration for `gateways` servers: its three `server gwK`
/// lines become one per gateway (same form, addresses from AISHELL_GWK),
/// and a stats socket is added so the bench can see when HAProxy has
/// every gateway UP. Everything else is as shipped.
pub fn config(gateways: usize, socket: &Path) -> String {
    let mut out = String::new();
    for line in SHIPPED.lines() {
        if line.trim_start().starts_with("server gw") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.trim() == "global" {
            out.push_str(&format!(
                "    stats socket \"{}\" mode 600 level user\n",
                socket.display()
            ));
        }
    }
    for k in 1..=gateways {
        out.push_str(&format!("    server gw{k} \"${{AISHELL_GW{k}}}\"\n"));
    }
    out
}

impl Haproxy {
    /// Write the configuration into `dir` and start `haproxy -db` on
    /// `port`, in front of the gateways on `gateways` (loopback ports).
    pub fn start(dir: &Path, port: u16, gateways: &[u16]) -> anyhow::Result<Haproxy> {
        let socket = dir.join("haproxy.sock");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(gateways.len(), &socket))?;
        let version = Command::new("haproxy")
            .arg("-v")
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "BENCH_HAPROXY_MISSING: haproxy is not on PATH; install it (Debian: apt-get install haproxy)"
                    )
                } else {
                    anyhow::anyhow!("BENCH_HAPROXY_FAILED: cannot run haproxy -v: {e}")
                }
            })?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let log = dir.join("haproxy.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .env("AISHELL_LB_BIND", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        for (i, p) in gateways.iter().enumerate() {
            cmd.env(format!("AISHELL_GW{}", i + 1), format!("127.0.0.1:{p}"));
        }
        // SAFETY: setpgid and prctl only, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                // Its own group: a terminal's Ctrl-C reaches the bench,
                // which stops everything in order.
                libc::setpgid(0, 0);
                // The bench killed outright takes HAProxy with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("BENCH_HAPROXY_FAILED: cannot start haproxy")?;
        Ok(Haproxy {
            child,
            socket,
            log,
            version,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (up to `limit`) until HAProxy has all `n` gateways UP.
    pub async fn wait_all_up(&mut self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = Vec::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "BENCH_HAPROXY_FAILED: haproxy exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Some(states) = self.server_states() {
                if states.len() == n && states.iter().all(|(_, s)| s == "UP") {
                    return Ok(());
                }
                last = states;
            }
            if Instant::now() > deadline {
                bail!(
                    "BENCH_NOT_READY: HAProxy did not see every gateway UP within {} s: {last:?}",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `(server, status)` of the `gateways` backend, from the stats socket.
    fn server_states(&self) -> Option<Vec<(String, String)>> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        s.read_to_string(&mut csv).ok()?;
        Some(parse_states(&csv))
    }
}

/// The `gateways` backend's servers and their status in `show stat` CSV.
fn parse_states(csv: &str) -> Vec<(String, String)> {
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&"gateways"))
        .filter(|f| f.get(sv).is_some_and(|s| s.starts_with("gw")))
        .filter_map(|f| Some((f.get(sv)?.to_string(), f.get(st)?.to_string())))
        .collect()
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGTERM: HAProxy's hard stop; then make sure it is gone.
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_the_shipped_one_with_one_server_per_gateway() {
        let cfg = config(2, Path::new("/tmp/x/haproxy.sock"));
        let servers: Vec<&str> = cfg
            .lines()
            .filter(|l| l.trim_start().starts_with("server "))
            .collect();
        assert_eq!(
            servers,
            [
                "    server gw1 \"${AISHELL_GW1}\"",
                "    server gw2 \"${AISHELL_GW2}\""
            ]
        );
        assert!(cfg.contains("global\n    stats socket \"/tmp/x/haproxy.sock\""));
        // Every other line of the shipped file is there, in order.
        let kept: Vec<&str> = SHIPPED
            .lines()
            .filter(|l| !l.trim_start().starts_with("server gw"))
            .collect();
        let got: Vec<&str> = cfg
            .lines()
            .filter(|l| !l.trim_start().starts_with("server ") && !l.contains("stats socket"))
            .collect();
        assert_eq!(got, kept);
        assert!(cfg.contains("option httpchk GET /ready"));
    }

    #[test]
    fn server_states_are_read_from_show_stat() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   aishell,FRONTEND,,OPEN,\n\
                   gateways,gw1,0,UP,1\n\
                   gateways,gw2,0,DOWN,1\n\
                   gateways,BACKEND,0,UP,2\n";
        assert_eq!(
            parse_states(csv),
            [
                ("gw1".to_string(), "UP".to_string()),
                ("gw2".to_string(), "DOWN".to_string())
            ]
        );
    }
}
