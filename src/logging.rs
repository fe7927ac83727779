//! Logging rules shared by every entry point.

use std::io::IsTerminal as _;

/// Crates whose logs may contain key material (the netlink crates print whole messages,
/// SA keys included, at trace level, and raw bytes on decode errors). Every tracing
/// filter of ours turns them off, whatever RUST_LOG says.
pub const SILENCED_TARGETS: &[&str] = &[
    "netlink_proto",
    "netlink_sys",
    "netlink_packet_core",
    "netlink_packet_route",
    "netlink_packet_xfrm",
    "rtnetlink",
    "xfrmnetlink",
    "snow",
];

/// How log events are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One line per event for people; coloured only on a terminal.
    Text,
    /// One JSON object per line for log collectors.
    Json,
}

/// Installs the global subscriber: RUST_LOG if set, else `level`, always with
/// [`SILENCED_TARGETS`] off. Colour only when standard error is a terminal and NO_COLOR
/// is unset, so that journald and log files get plain text.
pub fn init(level: &str, format: Format) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    for quiet in SILENCED_TARGETS {
        if let Ok(directive) = format!("{quiet}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    // A second init (tests) is refused by tracing; that is fine.
    let _ = match format {
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        Format::Text => builder.with_ansi(use_colour()).try_init(),
    };
}

fn use_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}
