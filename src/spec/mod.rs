//! The user's network spec (`apiVersion: ovl/v1`): typed, validated, trusted after parsing.
//!
//! ```text
//! YAML text --serde-saphyr (with spans)--> raw model --validate--> Spec
//! ```
//! Every rejection carries `file:line:column` and a one-line reason, and happens before
//! anything touches the kernel.

mod fields;
mod parse;
mod raw;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use parse::{MAX_SPEC_BYTES, parse};
pub use types::*;
