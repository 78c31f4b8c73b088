//! Progress of fill, import, dump and check: an indicatif bar with bytes and rate when stdout
//! is a terminal, SPDK's `Working....` dots (one per io_unit) when it is not, so transcripts
//! stay comparable with SPDK's.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One progress display.
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// A display that shows nothing (JSON output).
    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            quiet: true,
        }
    }

    /// Starts a display for `total_bytes`. In plain mode this prints `Working`.
    pub fn start(out: &mut dyn Write, total_bytes: u64, what: &str) -> Progress {
        if std::io::stdout().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            Progress {
                bar: Some(bar),
                quiet: false,
            }
        } else {
            let _ = write!(out, "Working");
            Progress {
                bar: None,
                quiet: false,
            }
        }
    }

    /// Whether no dots are printed (a terminal bar, or hidden).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some() || self.quiet
    }

    /// Records `bytes` more done; prints `dots` dots in plain mode.
    pub fn advance(&self, out: &mut dyn Write, bytes: u64, dots: u64) {
        match &self.bar {
            Some(b) => b.inc(bytes),
            None if self.quiet => {}
            None => {
                const DOTS: &str =
                    "................................................................";
                let mut left = dots as usize;
                while left > 0 {
                    let n = left.min(DOTS.len());
                    let _ = out.write_all(&DOTS.as_bytes()[..n]);
                    left -= n;
                }
            }
        }
    }

    /// Removes the bar. In plain mode nothing is printed (the caller prints the newline and
    /// the completion line, as SPDK does).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
