//! Progress of long operations (a large apply, a rotation with many peers), reported by
//! the library and shown by the CLI on a terminal. Reports carry counts only, never a key
//! or a spec.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `done` of `total` units of `what` (for example "kernel changes applied").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub what: String,
    pub done: u64,
    pub total: u64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        write!(
            f,
            "{}: {}/{} ({percent}%)",
            self.what, self.done, self.total
        )
    }
}

/// Where progress reports go. Called from the thread doing the work: must be quick.
pub type Sink = Arc<dyn Fn(&Progress) + Send + Sync>;
