//! The HTTP accept loop (ARCHITECTURE.md "Authentication, limits, files"):
//! hyper's HTTP/1 server with upgrades, plus what `axum::serve` lacks.
//!
//! * A request's headers must arrive within `header_read_timeout` (hyper's
//!   timer, and our own deadline on a connection's first request).
//! * A WebSocket upgrade request is answered within `pre_upgrade_timeout`.
//! * At most `max_connections` connections at once, WebSockets included
//!   (the count is released when the socket closes); more get 503.
//! * At most `max_pending_connections_per_address` connections per address
//!   that have not sent a complete request (and so not authenticated); more
//!   get 429. Slow or half-open clients cannot crowd out others.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::GatewayConfig;

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub pre_upgrade_timeout: Duration,
    pub max_connections: usize,
    pub max_pending_per_address: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub drain: Duration,
}

impl HttpLimits {
    pub fn from_config(cfg: &GatewayConfig) -> Self {
        HttpLimits {
            header_read_timeout: cfg.header_read_timeout,
            pre_upgrade_timeout: cfg.pre_upgrade_timeout,
            max_connections: cfg.max_connections.max(1),
            max_pending_per_address: cfg.max_pending_connections_per_address.max(1),
            drain: cfg.deadlines.stop,
        }
    }
}

const REFUSED_BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const REFUSED_PENDING: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// Connections per address that have not sent a complete request yet.
#[derive(Default)]
struct Pending(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`Pending`], given back on its first request
/// (or when it closes).
struct PendingSlot {
    table: Arc<Pending>,
    addr: IpAddr,
    held: AtomicBool,
}

impl Pending {
    fn enter(self: &Arc<Self>, addr: IpAddr, cap: usize) -> Option<PendingSlot> {
        let mut table = self.0.lock().expect("pending table");
        let n = table.entry(addr).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(PendingSlot {
            table: self.clone(),
            addr,
            held: AtomicBool::new(true),
        })
    }
}

impl PendingSlot {
    fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            let mut table = self.table.0.lock().expect("pending table");
            if let Some(n) = table.get_mut(&self.addr) {
                *n -= 1;
                if *n == 0 {
                    table.remove(&self.addr);
                }
            }
        }
    }

    fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// A TCP stream that holds its place under the global connection cap for as
/// long as it is open, including after a WebSocket upgrade.
struct CountedStream {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Count a connection the limits closed, by reason.
fn refused(reason: &'static str) {
    metrics::counter!("aishell_http_connections_refused_total", "reason" => reason).increment(1);
}

/// Refuse a connection at once: a one-line answer if the socket takes it, then close.
fn refuse(tcp: TcpStream, answer: &[u8]) {
    let _ = tcp.try_write(answer);
}

/// Serve `router` on `listener` until `shutdown`; then stop accepting, ask
/// open HTTP connections to finish and wait for them (at most `drain`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let pending = Arc::new(Pending::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each HTTP connection task holds a clone; shutdown waits for them.
    let in_flight = Arc::new(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(event = "http_accept_failed", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused("max_connections");
            refuse(tcp, REFUSED_BUSY);
            continue;
        };
        let Some(slot) = pending.enter(peer.ip(), limits.max_pending_per_address) else {
            refused("pending_per_address");
            refuse(tcp, REFUSED_PENDING);
            continue;
        };
        // Small frames must not wait for Nagle + delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let stream = CountedStream {
            tcp,
            _permit: permit,
        };
        tokio::spawn(connection(
            stream,
            slot,
            router.clone(),
            limits.clone(),
            stop_rx.clone(),
            in_flight.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + limits.drain;
    while Arc::strong_count(&in_flight) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connection(
    stream: CountedStream,
    slot: PendingSlot,
    router: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
    _in_flight: Arc<()>,
) {
    let slot = Arc::new(slot);
    let tower = TowerToHyperService::new(router);
    let first_request = slot.clone();
    let upgrade_limit = limits.pre_upgrade_timeout;
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        // Headers read: the connection is no longer a pending one.
        first_request.release();
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let answer = hyper::service::Service::call(&tower, req);
        async move {
            if !upgrade {
                return answer.await;
            }
            match tokio::time::timeout(upgrade_limit, answer).await {
                Ok(response) => response,
                Err(_) => Ok::<_, Infallible>(
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the upgrade request was not answered in time",
                    )
                        .into_response(),
                ),
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    // Our own bound on the first request, whatever the parser is waiting for.
    let first_deadline = tokio::time::sleep(limits.header_read_timeout);
    let mut first_deadline = std::pin::pin!(first_deadline);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = &mut first_deadline, if slot.is_held() => {
                refused("header_timeout");
                return;
            }
            changed = stop.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
