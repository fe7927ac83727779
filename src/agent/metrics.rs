//! Prometheus text metrics from the agent: off by default; `--metrics-address PORT`
//! (loopback) or `IP:PORT`. A minimal HTTP/1.0 responder: GET /metrics only, one
//! request per connection, bounded reads. Never a key: SPIs, counters, states.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::Event;
use crate::status::Status;

/// Parses `--metrics-address`: a bare port means 127.0.0.1:PORT.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("invalid metrics address {s:?}: use PORT or IP:PORT"))
}

/// Scrapers served at once; more connections are closed unanswered (each waiting one
/// would hold a file descriptor).
pub const MAX_METRICS_CLIENTS: usize = 8;

/// How long one rendering is served again: the agent reads the kernel for it, so a
/// scraper hammering the endpoint costs the agent at most one read per this interval.
pub const METRICS_FRESH_FOR: Duration = Duration::from_secs(1);

/// How long a client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn spawn(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CLIENTS));
    // The last rendering; its lock also makes concurrent scrapes wait for one read.
    let last: std::sync::Arc<tokio::sync::Mutex<Option<(std::time::Instant, String)>>> =
        Default::default();
    tokio::spawn(async move {
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, or the like: no busy loop.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (events, last) = (events.clone(), last.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(CLIENT_TIMEOUT, stream.read(&mut buf)).await;
                let Ok(Ok(n)) = read else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if request.starts_with("GET /metrics") {
                    match rendered(&events, &last).await {
                        Some(text) => ("200 OK", text),
                        None => ("503 Service Unavailable", String::new()),
                    }
                } else {
                    ("404 Not Found", "only /metrics is served\n".to_owned())
                };
                let head = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(body.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
            });
        }
    });
}

/// The metrics text: the last rendering while fresh, else a new one from the agent.
async fn rendered(
    events: &mpsc::UnboundedSender<Event>,
    last: &tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
) -> Option<String> {
    let mut last = last.lock().await;
    if let Some((at, text)) = last.as_ref()
        && at.elapsed() < METRICS_FRESH_FOR
    {
        return Some(text.clone());
    }
    let (reply, answer) = oneshot::channel();
    events.send(Event::Metrics { reply }).ok()?;
    let text = answer.await.ok()?;
    *last = Some((std::time::Instant::now(), text.clone()));
    Some(text)
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the agent's status as Prometheus text (names documented in the README).
pub fn render(
    status: &Status,
    reconciles: u64,
    reconcile_failures: u64,
    kernel_changes: u64,
    kernel_reads: crate::kernel::WatchStats,
) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    metric("ovl_agent_up", "1 while the agent runs.", "gauge");
    metric(
        "ovl_agent_in_sync",
        "1 when the last reconcile pass succeeded.",
        "gauge",
    );
    metric("ovl_reconciles_total", "Reconcile passes run.", "counter");
    metric(
        "ovl_reconcile_failures_total",
        "Reconcile passes that failed.",
        "counter",
    );
    metric(
        "ovl_kernel_changes_total",
        "Kernel changes applied by reconcile passes.",
        "counter",
    );
    metric(
        "ovl_kernel_reads_total",
        "Reads of the kernel's objects: full, or answered from the kept view while the kernel \
         announced no change.",
        "counter",
    );
    metric(
        "ovl_networks",
        "Overlay networks present on this node.",
        "gauge",
    );
    metric(
        "ovl_peer_connected",
        "1 when the control session with the peer is up.",
        "gauge",
    );
    metric(
        "ovl_sa_packets",
        "Packets carried by the SA (kernel counter).",
        "gauge",
    );
    metric(
        "ovl_sa_bytes",
        "Bytes carried by the SA (kernel counter).",
        "gauge",
    );
    metric(
        "ovl_sa_age_seconds",
        "Seconds since the SA was installed.",
        "gauge",
    );
    metric(
        "ovl_key_generation",
        "Generation of the key in use per peer and direction.",
        "gauge",
    );
    metric(
        "ovl_xfrm_errors",
        "The kernel's XFRM error counters (/proc/net/xfrm_stat).",
        "gauge",
    );
    let agent = status.agent.as_ref();
    let _ = writeln!(out, "ovl_agent_up 1");
    let _ = writeln!(
        out,
        "ovl_agent_in_sync {}",
        u8::from(agent.is_some_and(|a| a.in_sync))
    );
    let _ = writeln!(out, "ovl_reconciles_total {reconciles}");
    let _ = writeln!(out, "ovl_reconcile_failures_total {reconcile_failures}");
    let _ = writeln!(out, "ovl_kernel_changes_total {kernel_changes}");
    let _ = writeln!(
        out,
        "ovl_kernel_reads_total{{kind=\"full\"}} {}",
        kernel_reads.full
    );
    let _ = writeln!(
        out,
        "ovl_kernel_reads_total{{kind=\"reused\"}} {}",
        kernel_reads.reused
    );
    let _ = writeln!(out, "ovl_networks {}", status.networks.len());
    for p in agent.map(|a| a.peers.as_slice()).unwrap_or_default() {
        let peer = label(&p.name);
        let _ = writeln!(
            out,
            "ovl_peer_connected{{peer=\"{peer}\"}} {}",
            u8::from(p.connected)
        );
        for (dir, keys) in [("in", &p.inbound), ("out", &p.outbound)] {
            if let Some(k) = keys
                .iter()
                .rev()
                .find(|k| k.state == "active" || k.state == "adopted")
            {
                let _ = writeln!(
                    out,
                    "ovl_key_generation{{peer=\"{peer}\",direction=\"{dir}\"}} {}",
                    k.generation
                );
            }
        }
    }
    for sa in &status.sas {
        let l = format!(
            "src=\"{}\",dst=\"{}\",spi=\"{}\"",
            label(&sa.src),
            label(&sa.dst),
            label(&sa.spi)
        );
        let _ = writeln!(out, "ovl_sa_packets{{{l}}} {}", sa.packets);
        let _ = writeln!(out, "ovl_sa_bytes{{{l}}} {}", sa.bytes);
        let _ = writeln!(out, "ovl_sa_age_seconds{{{l}}} {}", sa.age_secs);
    }
    for e in &status.xfrm_errors {
        let _ = writeln!(
            out,
            "ovl_xfrm_errors{{counter=\"{}\"}} {}",
            label(&e.counter),
            e.value
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// A scraper hammering the endpoint costs the agent one rendering per
    /// [`METRICS_FRESH_FOR`]; connections past [`MAX_METRICS_CLIENTS`] are closed
    /// unanswered, and a slot given back serves the next scraper.
    #[tokio::test]
    async fn scrapes_are_cached_and_clients_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn(listener, tx);
        let renderings = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = renderings.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Event::Metrics { reply } = event {
                    let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let _ = reply.send(format!("ovl_test {n}\n"));
                }
            }
        });
        let started = std::time::Instant::now();
        let mut answers = Vec::new();
        for _ in 0..20 {
            answers.push(get(addr).await);
        }
        assert!(answers.iter().all(|a| a.starts_with("HTTP/1.0 200 OK")));
        let rendered = renderings.load(std::sync::atomic::Ordering::SeqCst);
        let bound = started.elapsed().as_secs() as usize + 1;
        assert!(
            (1..=bound).contains(&rendered),
            "{rendered} renderings for 20 scrapes in {:?}",
            started.elapsed()
        );

        // Idle clients hold every slot: the next connection is closed unanswered.
        let mut idle = Vec::new();
        for _ in 0..MAX_METRICS_CLIENTS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf))
            .await
            .expect("closed at once");
        // Closed: end of stream, or a reset; either way nothing was answered.
        assert!(closed.map_or(true, |n| n == 0) && buf.is_empty());
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(addr).await.starts_with("HTTP/1.0 200 OK"));
    }
}
