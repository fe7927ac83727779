//! Progress of long operations on a terminal: one line on stderr, redrawn in place at
//! most ten times a second and erased at the end. Nothing is written when stderr is not
//! a terminal (cron, systemd, pipes), so logs and scripts never see it.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ovl::progress::{Progress, Sink};

const REDRAW_EVERY: Duration = Duration::from_millis(100);

pub struct Terminal {
    enabled: bool,
    last_draw: Option<Instant>,
    drawn: bool,
}

impl Terminal {
    pub fn new() -> Terminal {
        Terminal {
            enabled: std::io::stderr().is_terminal(),
            last_draw: None,
            drawn: false,
        }
    }

    pub fn show(&mut self, p: &Progress) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let finished = p.done >= p.total;
        if !finished && self.last_draw.is_some_and(|t| now - t < REDRAW_EVERY) {
            return;
        }
        self.last_draw = Some(now);
        self.drawn = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{p}");
        let _ = err.flush();
    }

    /// Erases the progress line, if one was drawn.
    pub fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }

    /// A sink for the library (shared with the thread doing the work).
    pub fn shared(self) -> (Arc<Mutex<Terminal>>, Sink) {
        let terminal = Arc::new(Mutex::new(self));
        let for_sink = terminal.clone();
        let sink: Sink = Arc::new(move |p: &Progress| {
            if let Ok(mut t) = for_sink.lock() {
                t.show(p);
            }
        });
        (terminal, sink)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.finish();
    }
}
