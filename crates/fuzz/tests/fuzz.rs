//! Runs every fuzz target on its seed corpus (`corpus/<target>/`) and then on mutations of it
//! for `GEMMA_FUZZ_SECONDS` seconds each (default 6; 0 runs the corpus only), printing one
//! line per target. A crash fails the run; its input is saved under `target/fuzz-crashes/`.
//!
//! `GEMMA_FUZZ_TARGETS=gguf,image` runs only those targets; `GEMMA_FUZZ_SEED` changes the
//! mutation sequence (default fixed, so CI runs are repeatable up to where time stops them).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use gemma_fuzz::{driver, TARGETS};

fn crash_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("fuzz-crashes")
}

fn main() -> ExitCode {
    let seconds: f64 = std::env::var("GEMMA_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .unwrap_or(6.0);
    let seed: u64 = std::env::var("GEMMA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let only = std::env::var("GEMMA_FUZZ_TARGETS").ok();
    let selected: Vec<_> = TARGETS
        .iter()
        .filter(|(name, _)| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|s| s == *name))
        })
        .collect();
    // `cargo test -- --list` and filters meant for other tests: this binary has no named tests.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }

    let corpus_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let crash_dir = crash_dir();
    driver::install_quiet_panic_hook();
    let mut failed = 0;
    for &&(name, target) in &selected {
        let corpus = driver::read_corpus(&corpus_root.join(name));
        let budget = Duration::from_secs_f64(seconds);
        let report = driver::run(name, target, &corpus, budget, seed, &crash_dir);
        println!("{report}");
        if report.slowest.0 > Duration::from_secs(1) {
            let slow = format!("{name}-slow");
            if let Some(path) = driver::save_crash(&crash_dir, &slow, &report.slowest.1) {
                println!("  slowest input saved to {}", path.display());
            }
        }
        if report.crash.is_some() || corpus.is_empty() {
            if corpus.is_empty() {
                println!("  no seed corpus in {}", corpus_root.join(name).display());
            }
            failed += 1;
        }
    }
    let _ = std::fs::remove_dir_all(gemma_fuzz::scratch_root());
    if failed > 0 {
        println!("fuzz: {failed} of {} targets failed", selected.len());
        ExitCode::FAILURE
    } else {
        println!("fuzz: {} targets, 0 crashes", selected.len());
        ExitCode::SUCCESS
    }
}
