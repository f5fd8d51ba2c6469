//! A small stable-Rust fuzz driver: runs a target on its seed corpus, then on seeded mutations
//! of it (bit flips, byte inserts and deletes, interesting integers, splices between entries,
//! chunk duplication) until a time budget is spent. A panic is a crash: the input is written
//! to `<crash_dir>/<target>-<hash>` and the run stops.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Inputs grow no longer than this (larger seeds are mutated but not extended).
const MAX_INPUT: usize = 1 << 16;

/// What one target's run did.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    pub corpus: usize,
    pub elapsed: Duration,
    /// The longest any one input took, and that input.
    pub slowest: (Duration, Vec<u8>),
    pub crash: Option<Crash>,
}

#[derive(Debug)]
pub struct Crash {
    pub message: String,
    pub input: Vec<u8>,
    pub saved_to: Option<PathBuf>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {}: {} inputs (corpus {}), {} crashes, {:.1} s (slowest input {:.0} ms)",
            self.target,
            self.inputs,
            self.corpus,
            usize::from(self.crash.is_some()),
            self.elapsed.as_secs_f64(),
            self.slowest.0.as_secs_f64() * 1e3
        )?;
        if let Some(crash) = &self.crash {
            let prefix: String = crash
                .input
                .iter()
                .take(32)
                .map(|b| format!("{b:02x}"))
                .collect();
            write!(
                f,
                "\n  panic: {}\n  input: {} bytes, starts {prefix}",
                crash.message,
                crash.input.len()
            )?;
            if let Some(path) = &crash.saved_to {
                write!(f, "\n  saved to {}", path.display())?;
            }
        }
        Ok(())
    }
}

/// xorshift64*: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One random edit of `input`; `corpus` supplies splice material.
pub fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
    let len = input.len();
    match rng.below(8) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next_u64() as u8;
        }
        2 if len < MAX_INPUT => {
            let i = rng.below(len + 1);
            input.insert(i, rng.next_u64() as u8);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            input.drain(i..i + n);
        }
        4 if len > 0 => {
            // An interesting integer, little-endian (GGUF, safetensors) or big-endian (PNG,
            // JPEG), 1 to 8 bytes wide.
            let value = INTERESTING[rng.below(INTERESTING.len())];
            let width = [1, 2, 4, 8][rng.below(4)];
            let bytes = if rng.below(2) == 0 {
                value.to_le_bytes()
            } else {
                (value << (8 * (8 - width))).to_be_bytes()
            };
            let i = rng.below(len);
            let n = width.min(len - i);
            input[i..i + n].copy_from_slice(&bytes[..n]);
        }
        5 if !corpus.is_empty() => {
            // Splice: keep a prefix of this input, append a suffix of another entry.
            let other = &corpus[rng.below(corpus.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
            input.truncate(MAX_INPUT);
        }
        6 if len > 0 && len < MAX_INPUT => {
            // Duplicate a chunk somewhere else (repeated structures, nesting).
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk = input[i..i + n].to_vec();
            let at = rng.below(len + 1);
            input.splice(at..at, chunk);
            input.truncate(MAX_INPUT);
        }
        7 if len > 0 => {
            // Truncate: parsers must handle every premature end.
            input.truncate(rng.below(len));
        }
        _ => input.push(rng.next_u64() as u8),
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the panic hook with one that records the message for [`run`] instead of printing
/// it (decoders that catch their own panics stay quiet). Call once, before fuzzing.
pub fn install_quiet_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string payload)".into());
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{payload}{location}")));
    }));
}

fn run_one(target: fn(&[u8]), input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| target(input))).map_err(|_| {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panic".into())
    })
}

/// The files of `dir`, sorted by name (missing folder: none).
pub fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Runs `target` on every corpus entry, then on mutations of them until `budget` has passed.
/// Mutations are stacked 1 to 8 deep on a random entry; `seed` makes the sequence repeatable
/// (the time budget only decides where it stops).
pub fn run(
    name: &'static str,
    target: fn(&[u8]),
    corpus: &[Vec<u8>],
    budget: Duration,
    seed: u64,
    crash_dir: &Path,
) -> Report {
    let start = Instant::now();
    let mut report = Report {
        target: name,
        inputs: 0,
        corpus: corpus.len(),
        elapsed: Duration::ZERO,
        slowest: (Duration::ZERO, Vec::new()),
        crash: None,
    };
    let mut rng = Rng::new(seed ^ hash(name.as_bytes()));
    let mut input = Vec::new();
    loop {
        let n = report.inputs as usize;
        if n < corpus.len() {
            input.clone_from(&corpus[n]);
        } else {
            if start.elapsed() >= budget {
                break;
            }
            input = match corpus.len() {
                0 => Vec::new(),
                len => corpus[rng.below(len)].clone(),
            };
            for _ in 0..1 + rng.below(8) {
                mutate(&mut input, corpus, &mut rng);
            }
        }
        report.inputs += 1;
        let one = Instant::now();
        let outcome = run_one(target, &input);
        if one.elapsed() > report.slowest.0 {
            report.slowest = (one.elapsed(), input.clone());
        }
        if let Err(message) = outcome {
            let saved_to = save_crash(crash_dir, name, &input);
            report.crash = Some(Crash {
                message,
                input,
                saved_to,
            });
            break;
        }
    }
    report.elapsed = start.elapsed();
    report
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Saves `input` as `<dir>/<name>-<hash>` and returns the path.
pub fn save_crash(dir: &Path, name: &str, input: &[u8]) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).ok()?;
    let path = dir.join(format!("{name}-{:016x}", hash(input)));
    std::fs::write(&path, input).ok()?;
    Some(path)
}
