//! Logging rules shared by every entry point.

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
