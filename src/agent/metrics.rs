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

pub(crate) fn spawn(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let events = events.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                let Ok(Ok(n)) = read else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if request.starts_with("GET /metrics") {
                    let (reply, answer) = oneshot::channel();
                    if events.send(Event::Metrics { reply }).is_err() {
                        return;
                    }
                    match answer.await {
                        Ok(text) => ("200 OK", text),
                        Err(_) => ("503 Service Unavailable", String::new()),
                    }
                } else {
                    ("404 Not Found", "only /metrics is served\n".to_owned())
                };
                let head = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
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
