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

/// Whether events of `target` are dropped: one of [`SILENCED_TARGETS`] or a module
/// below it.
pub fn is_silenced(target: &str) -> bool {
    SILENCED_TARGETS.iter().any(|quiet| {
        target
            .strip_prefix(quiet)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Installs the global subscriber: RUST_LOG if set, else `level`, and [`SILENCED_TARGETS`]
/// dropped by a filter of their own that no RUST_LOG directive can override (a
/// directive such as `netlink_proto::codecs=trace` is more specific than
/// `netlink_proto=off`, and would win inside one `EnvFilter`). Colour only when standard
/// error is a terminal and NO_COLOR is unset, so that journald and log files get plain
/// text.
pub fn init(level: &str, format: Format) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let requested = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // The level hint of RUST_LOG / `level` is kept, so that events below it are skipped
    // where they are written, not checked one by one.
    let hint = tracing_subscriber::layer::Filter::<tracing_subscriber::Registry>::max_level_hint(
        &requested,
    );
    let mut allowed = tracing_subscriber::filter::filter_fn(|meta| !is_silenced(meta.target()));
    if let Some(hint) = hint {
        allowed = allowed.with_max_level_hint(hint);
    }
    let filter = allowed.and(requested);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    // A second init (tests) is refused by tracing; that is fine.
    let _ = match format {
        Format::Json => registry
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_filter(filter),
            )
            .try_init(),
        Format::Text => registry
            .with(layer.with_ansi(use_colour()).with_filter(filter))
            .try_init(),
    };
}

fn use_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silenced_targets_cover_their_modules_only() {
        assert!(is_silenced("netlink_proto"));
        assert!(is_silenced("netlink_proto::codecs"));
        assert!(is_silenced("xfrmnetlink::state::get"));
        assert!(!is_silenced("netlink_protocol"));
        assert!(!is_silenced("ovl::kernel"));
    }
}
