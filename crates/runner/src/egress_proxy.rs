//! The agent's way out: a small HTTP proxy in the runner, listening inside
//! the sandbox's network namespace (see `netns`). The namespace itself has
//! no route anywhere, so every connection the agent makes to the outside
//! goes through here, named by host: `CONNECT host:port` (HTTPS, or any TCP
//! a client tunnels) and absolute-form `GET http://host/…` requests. The
//! agent's environment names it (`HTTP_PROXY`, `HTTPS_PROXY`, lower-case
//! too), which curl, pip, npm, git, Python's and Node's HTTP clients honour.
//!
//! The proxy resolves the name itself and connects only to addresses the
//! policy permits: never loopback, private, shared (CGNAT), link-local
//! (cloud metadata at 169.254.169.254 included), unique-local, multicast
//! or reserved ones, unless an operator allowed a range
//! (`--sandbox-egress-allow`). It connects to the very address it checked,
//! so a name that resolves differently a moment later changes nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The port the proxy listens on inside every sandbox.
pub const PROXY_PORT: u16 = 3128;
/// A request head larger than this is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send its request head, and a name to resolve or an
/// address to answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections through one sandbox's proxy at once; more wait.
const MAX_CONNECTIONS: usize = 256;

/// An address range, `a.b.c.d/n` or `x::/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address range (like 10.0.0.0/8)"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n) as u128, self.prefix, 32)
                    == masked(u32::from(a) as u128, self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.prefix, 128) == masked(u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// Which destinations the proxy connects to.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Vec<Cidr>,
}

impl EgressPolicy {
    /// `allow`: ranges permitted although the default refuses them.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        Ok(EgressPolicy {
            allow: allow.iter().map(|c| c.parse()).collect::<Result<_, _>>()?,
        })
    }

    /// `Err(why)` when the agent may not reach `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        match refused_range(ip) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// Why an address is not the outside, if it is not.
fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => refused_v4(a),
        IpAddr::V6(a) => refused_v6(a),
    }
}

fn refused_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [b0, b1, ..] = a.octets();
    if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_private() {
        Some("a private address")
    } else if a.is_link_local() {
        Some("a link-local address (cloud metadata lives there)")
    } else if b0 == 100 && (64..128).contains(&b1) {
        Some("a shared (carrier-grade NAT) address")
    } else if b0 == 0 || a.is_unspecified() {
        Some("an unspecified address")
    } else if a.is_multicast() || a.is_broadcast() || b0 >= 240 {
        Some("a multicast or reserved address")
    } else if b0 == 192 && b1 == 0 && a.octets()[2] == 0 {
        Some("an IETF protocol address")
    } else {
        None
    }
}

fn refused_v6(a: Ipv6Addr) -> Option<&'static str> {
    let first = a.segments()[0];
    if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_unspecified() {
        Some("an unspecified address")
    } else if first & 0xfe00 == 0xfc00 {
        Some("a unique-local (private) address")
    } else if first & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if a.segments()[..6] == [0; 6] || a.segments()[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // ::a.b.c.d (deprecated) and ::ffff:0:a.b.c.d translate to IPv4.
        Some("an IPv4-compatible address")
    } else if first == 0x64 && a.segments()[1] == 0xff9b {
        // NAT64: the IPv4 address it stands for decides.
        let s = a.segments();
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        refused_v4(v4)
    } else {
        None
    }
}

/// Serve the proxy on `listener` until the task is dropped; every
/// connection it carries ends with it.
pub async fn serve(listener: TcpListener, policy: Arc<EgressPolicy>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let policy = policy.clone();
                    connections.spawn(async move {
                        handle(conn, &policy).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(event = "egress_proxy_accept_failed", error = %e, "egress proxy cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A parsed request head: where to, and what to send there first.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `CONNECT host:port`: answer 200, then relay bytes.
    Tunnel { host: String, port: u16 },
    /// `METHOD http://host[:port]/path`: send `head` (origin-form) there.
    Forward {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

/// The end of a request head in `buf`, if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn parse_head(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not text")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {request_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}"));
    }
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(Request::Tunnel { host, port });
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return Err(if target.starts_with("https://") {
            "use CONNECT for https:// (set HTTPS_PROXY)".to_string()
        } else {
            format!(
                "{target:?} is not an absolute http:// URL; this is a proxy (CONNECT host:port or GET http://host/path)"
            )
        });
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let (host, port) = split_authority(authority, Some(80))?;
    let mut out = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        // Hop-by-hop and proxy credentials stay here; one request per
        // connection, so a reused connection cannot reach another host.
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Request::Forward {
        host,
        port,
        head: out.into_bytes(),
    })
}

/// `host:port`, `[v6]:port`, or (with a default port) `host`.
fn split_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("{authority:?} is not host:port");
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(bad()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Why a connection was not made: the status and sentence the agent gets.
struct Refusal {
    status: &'static str,
    message: String,
}

async fn handle(mut client: TcpStream, policy: &EgressPolicy) {
    let mut buf = Vec::with_capacity(1024);
    let head_len = match tokio::time::timeout(STEP_TIMEOUT, read_head(&mut client, &mut buf)).await
    {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(message)) => {
            return reply(&mut client, "400 Bad Request", &message).await;
        }
    };
    let request = match parse_head(&buf[..head_len]) {
        Ok(r) => r,
        Err(message) => return reply(&mut client, "400 Bad Request", &message).await,
    };
    let (host, port) = match &request {
        Request::Tunnel { host, port } | Request::Forward { host, port, .. } => {
            (host.clone(), *port)
        }
    };
    let mut upstream = match connect(&host, port, policy).await {
        Ok(s) => s,
        Err(r) => {
            tracing::info!(event = "egress_refused", host = %host, port = port, reason = %r.message, "egress proxy refused a destination");
            return reply(&mut client, r.status, &r.message).await;
        }
    };
    let leftover = &buf[head_len..];
    let sent = match &request {
        Request::Tunnel { .. } => {
            client
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
        }
        Request::Forward { head, .. } => upstream.write_all(head).await,
    };
    if sent.is_err() || upstream.write_all(leftover).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Read until the end of the request head; `Ok(None)` when the client left.
async fn read_head(client: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<usize>, String> {
    let mut chunk = [0u8; 2048];
    loop {
        let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(buf) {
            return Ok(Some(end));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(format!("request head over {MAX_HEAD_BYTES} bytes"));
        }
    }
}

async fn connect(host: &str, port: u16, policy: &EgressPolicy) -> Result<TcpStream, Refusal> {
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return Err(Refusal {
                    status: "502 Bad Gateway",
                    message: format!("aishell egress: cannot resolve {host}: {e}"),
                });
            }
            Err(_) => {
                return Err(Refusal {
                    status: "504 Gateway Timeout",
                    message: format!("aishell egress: resolving {host} took too long"),
                });
            }
        };
    let mut refused = None;
    let mut last_error = None;
    for addr in addrs {
        if let Err(why) = policy.check(addr.ip()) {
            refused.get_or_insert(format!(
                "aishell egress: {host} ({}) is {why}; the sandbox may only reach the outside",
                addr.ip()
            ));
            continue;
        }
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last_error = Some(format!("aishell egress: {host} ({addr}): {e}")),
            Err(_) => last_error = Some(format!("aishell egress: {host} ({addr}) did not answer")),
        }
    }
    Err(match (last_error, refused) {
        (Some(message), _) => Refusal {
            status: "502 Bad Gateway",
            message,
        },
        (None, Some(message)) => Refusal {
            status: "403 Forbidden",
            message,
        },
        (None, None) => Refusal {
            status: "502 Bad Gateway",
            message: format!("aishell egress: {host} has no address"),
        },
    })
}

async fn reply(client: &mut TcpStream, status: &str, message: &str) {
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// The agent's environment that sends its clients through the proxy;
/// local names stay direct (its model endpoint is on its own loopback).
pub fn agent_env() -> impl Iterator<Item = (String, String)> {
    let url = format!("http://127.0.0.1:{PROXY_PORT}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    [
        ("HTTP_PROXY", url.clone()),
        ("HTTPS_PROXY", url.clone()),
        ("http_proxy", url.clone()),
        ("https_proxy", url),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_policy_refuses_everything_that_is_not_the_outside() {
        let policy = EgressPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.17.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(policy.check(ip(refused)).is_err(), "{refused} was allowed");
        }
        for allowed in [
            "1.1.1.1",
            "93.184.216.34",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "64:ff9b::101:101",
        ] {
            assert!(policy.check(ip(allowed)).is_ok(), "{allowed} was refused");
        }
    }

    #[test]
    fn an_allowed_range_opens_exactly_that_range() {
        let policy = EgressPolicy::new(&["10.213.5.0/30".into(), "fd00::/64".into()]).unwrap();
        assert!(policy.check(ip("10.213.5.2")).is_ok());
        assert!(policy.check(ip("::ffff:10.213.5.3")).is_ok());
        assert!(policy.check(ip("10.213.5.4")).is_err());
        assert!(policy.check(ip("fd00::5")).is_ok());
        assert!(policy.check(ip("fd00:0:0:1::5")).is_err());
        assert!(policy.check(ip("127.0.0.1")).is_err());
        let all = EgressPolicy::new(&["0.0.0.0/0".into()]).unwrap();
        assert!(all.check(ip("127.0.0.1")).is_ok());
        assert!(EgressPolicy::new(&["10.0.0.0/33".into()]).is_err());
        assert!(EgressPolicy::new(&["example.com/8".into()]).is_err());
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap(),
            "10.1.2.3/32".parse().unwrap()
        );
    }

    #[test]
    fn requests_parse_into_where_to_and_what_to_send() {
        assert_eq!(
            parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
            Ok(Request::Tunnel {
                host: "example.com".into(),
                port: 443
            })
        );
        assert_eq!(
            parse_head(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n"),
            Ok(Request::Tunnel {
                host: "2001:db8::1".into(),
                port: 8443
            })
        );
        let Ok(Request::Forward { host, port, head }) = parse_head(
            b"GET http://example.com/a/b?c=1 HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: Basic x\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        ) else {
            panic!("not a forward")
        };
        assert_eq!((host.as_str(), port), ("example.com", 80));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a/b?c=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let Ok(Request::Forward { port, head, .. }) =
            parse_head(b"GET http://example.com:8080?x HTTP/1.0\r\n\r\n")
        else {
            panic!("not a forward")
        };
        assert_eq!(port, 8080);
        assert!(head.starts_with(b"GET /?x HTTP/1.0\r\n"));
        for bad in [
            &b"GET /local HTTP/1.1\r\n\r\n"[..],
            b"GET https://example.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT example.com HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            b"CONNECT :443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 SPDY/3\r\n\r\n",
            b"CONNECT example.com:443\r\n\r\n",
            b"\xff\xfe HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// The proxy end to end on the host's loopback: a refused destination
    /// gets 403 and is never connected to; an allowed one is relayed both
    /// ways; garbage gets 400.
    #[tokio::test]
    async fn the_proxy_relays_what_the_policy_allows_and_refuses_the_rest() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_port = target.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = target.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            }
        });
        let start = |policy: EgressPolicy| async move {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(serve(l, Arc::new(policy)));
            port
        };
        let strict = start(EgressPolicy::default()).await;
        let open = start(EgressPolicy::new(&["127.0.0.0/8".into()]).unwrap()).await;

        let exchange = |proxy: u16, request: String| async move {
            let mut s = TcpStream::connect(("127.0.0.1", proxy)).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while head_end(&head).is_none() {
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            (String::from_utf8_lossy(&head).into_owned(), s)
        };
        let connect = format!("CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n\r\n");
        let (head, mut s) = exchange(strict, connect.clone()).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("loopback"), "{body}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

        let (head, mut s) = exchange(open, connect).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        let (head, _) = exchange(strict, "HELLO\r\n\r\n".into()).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        let (head, _) = exchange(strict, "GET http://localhost:1/ HTTP/1.1\r\n\r\n".into()).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    }
}
