//! Bytes -> [`Spec`]: size and encoding checks, YAML with bounded resources, then the
//! rules in [`super::validate`]. Every failure is a [`SpecError`] with a location and a
//! one-line reason.
//!
//! ```
//! let yaml = b"apiVersion: ovl/v1\ncluster: {name: demo}\nnodes: [{name: a, address: 192.0.2.1}]\n";
//! let spec = ovl::spec::parse(yaml, "demo.yaml").unwrap();
//! assert_eq!(spec.cluster.data_port, ovl::spec::DEFAULT_DATA_PORT);
//!
//! let err = ovl::spec::parse(b"apiVersion: ovl/v2\n", "old.yaml").unwrap_err();
//! assert_eq!(err.to_string(), "old.yaml:1:13: unsupported apiVersion `ovl/v2`: this version of ovl-controller reads ovl/v1");
//! ```

use serde_saphyr::{
    DuplicateKeyPolicy, Error as YamlError, MessageFormatter as _, Options, Spanned,
    UserMessageFormatter,
};

use super::raw::{RawHeader, RawSpec};
use super::types::{Spec, SpecError};
use super::validate::{self, Errors, one_line};

/// Largest spec accepted, in bytes. A real spec is a few kilobytes; the cap keeps a
/// mistaken `-f /dev/zero` or a hostile file from costing memory and time.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Parse and validate a spec. `source_name` (the path, or `<stdin>`) prefixes every error.
pub fn parse(bytes: &[u8], source_name: &str) -> Result<Spec, SpecError> {
    let e = Errors { source_name };
    let start = serde_saphyr::Location::UNKNOWN;
    if bytes.len() > MAX_SPEC_BYTES {
        return Err(e.at(
            start,
            // The CLI reads at most one byte past the limit, so the real size is unknown.
            format!("the spec is larger than the limit of {MAX_SPEC_BYTES} bytes"),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|err| utf8_error(source_name, bytes, err))?;

    // First only `apiVersion`, so a spec for another version says so rather than failing
    // on fields this version does not know. Any YAML error is reported by the full pass.
    if let Ok(Some(header)) =
        serde_saphyr::from_str_with_options::<Option<RawHeader>>(text, options())
        && let Some(v) = &header.api_version
    {
        validate::check_api_version(&e, &v.value, validate::loc(v))?;
    }

    let raw: Option<Spanned<RawSpec>> =
        serde_saphyr::from_str_with_options(text, options()).map_err(|err| yaml_error(&e, &err))?;
    let Some(raw) = raw else {
        return Err(e.at(
            start,
            "the spec is empty: expected a mapping with apiVersion, cluster and nodes",
        ));
    };
    validate::spec(&e, &raw.value, validate::loc(&raw))
}

/// Parser options: strict where YAML is surprising, and bounded so that a small hostile
/// file (alias bombs, deep nesting, anchor storms) cannot cost much time or memory.
fn options() -> Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            // The schema nests 4 levels; 16 is room to spare, and no more.
            max_depth: 16,
            flow_nesting_limit: 16,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_merge_keys: 1_000,
            max_recorded_anchor_events: 100_000,
            max_recorded_anchor_bytes: 4 * MAX_SPEC_BYTES,
            max_total_scalar_bytes: 4 * MAX_SPEC_BYTES,
            max_events: 1_000_000,
            max_nodes: 250_000,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 1_000,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        // `encrypted: yes` or `on` is not a boolean here: only true/false.
        strict_booleans: true,
        with_snippet: false,
    }
}

/// A YAML-level error: the library's location and its user-facing message on one line.
fn yaml_error(e: &Errors<'_>, err: &YamlError) -> SpecError {
    let mut inner = err;
    while let YamlError::AliasError { error, .. } | YamlError::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let reason = match inner {
        YamlError::Budget { breach, .. } => {
            format!("the YAML exceeds a parser limit ({breach:?}); a spec needs none of that")
        }
        other => plain_words(&UserMessageFormatter.format_message(other)),
    };
    let location = err.location().unwrap_or(serde_saphyr::Location::UNKNOWN);
    let mut out = e.at(location, one_line(&reason));
    if out.reason.is_empty() {
        out.reason = "invalid YAML".to_owned();
    }
    out
}

/// The parser's terse phrases for a value of the wrong shape, in the user's words.
fn plain_words(message: &str) -> String {
    const PHRASES: [(&str, &str); 4] = [
        (
            "recursion limit exceeded",
            "the YAML is nested too deeply (a parser limit)",
        ),
        (
            "expected mapping start",
            "expected a mapping (`key: value` lines) here",
        ),
        (
            "expected sequence start",
            "expected a list (`- item` lines or `[a, b]`) here",
        ),
        (
            "expected string scalar",
            "expected a single value (a string) here",
        ),
    ];
    PHRASES
        .iter()
        .find(|(terse, _)| message == *terse)
        .map_or_else(|| message.to_owned(), |(_, plain)| (*plain).to_owned())
}

/// Name the line and column (in characters) of the first byte that is not UTF-8.
fn utf8_error(source_name: &str, bytes: &[u8], err: std::str::Utf8Error) -> SpecError {
    let valid = bytes.get(..err.valid_up_to()).unwrap_or_default();
    // The prefix is valid UTF-8 by definition; fall back to bytes if not.
    let prefix = std::str::from_utf8(valid).unwrap_or_default();
    let line = prefix.matches('\n').count() as u64 + 1;
    let last_line = prefix.rsplit('\n').next().unwrap_or_default();
    let column = last_line.chars().count() as u64 + 1;
    SpecError {
        source_name: source_name.to_owned(),
        line,
        column,
        reason: "the spec is not valid UTF-8 text".to_owned(),
    }
}
