//! The Python package (`python/`, module `gemma_rs`) built with maturin and checked by its
//! pytest suite (`python/tests/test_gemma_rs.py`) against this `gemma` binary: generation,
//! streaming, chat, tokens, logits, errors, threads, JSON schemas and images.
//!
//! The package is installed into a virtual environment under the model cache
//! (`<cache>/venvs/python-package`, made with `python3 -m venv` and `pip install maturin pytest
//! numpy jsonschema` on first use) with `pip install ./python`; its Rust build goes to
//! `<target>/python`, so later runs only rebuild what changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const PACKAGES: &[&str] = &["maturin>=1.5,<2", "pytest", "numpy", "jsonschema"];

#[test]
fn python_package_passes_its_pytest_suite() {
    let started = Instant::now();
    let model = common::real_model();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root");
    let gemma = PathBuf::from(env!("CARGO_BIN_EXE_gemma"));
    // <target>/release/gemma -> <target>/python
    let target = gemma
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in <target>/<profile>")
        .join("python");

    let venv = package_venv();
    let python = venv.join("bin/python");
    let venv_ready = started.elapsed();

    // `pip install ./python`, with the venv's maturin (no build isolation: no download per
    // run) and a persistent target directory (only changed crates are rebuilt).
    let path = std::env::join_paths(std::iter::once(venv.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH can be joined");
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(["--no-build-isolation", "--force-reinstall", "--no-deps"])
        .arg(root.join("python"))
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", &path));
    let installed = started.elapsed();

    let output = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(root.join("python/tests"))
        .env("GEMMA_BIN", &gemma)
        .env("GEMMA_TEST_MODEL", &model)
        .env_remove("GEMMA_MODEL")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("pytest runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{log}");
    eprintln!(
        "python package: venv {:.1} s, build + install {:.1} s, pytest {:.1} s",
        venv_ready.as_secs_f64(),
        (installed - venv_ready).as_secs_f64(),
        (started.elapsed() - installed).as_secs_f64()
    );
    assert!(output.status.success(), "pytest failed:\n{log}");
    assert!(log.contains(" passed"), "{log}");
}

/// The venv's directory, creating the venv and installing the packages when missing. A stamp
/// file written after a successful install (holding the package list) marks it complete, so
/// an interrupted install, or a changed list, is redone.
fn package_venv() -> PathBuf {
    let dir = gemma_engine::default_model::cache_dir().join("venvs/python-package");
    let stamp = dir.join(".installed");
    let wanted = PACKAGES.join("\n");
    if dir.join("bin/python").exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
    {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).expect("the cache folder can be created");
    run(Command::new("python3").arg("-m").arg("venv").arg(&dir));
    run(Command::new(dir.join("bin/python"))
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PACKAGES));
    std::fs::write(&stamp, wanted).expect("the stamp can be written");
    dir
}

const NEEDS: &str = "The Python package test needs python3 with the venv module and pip (e.g. \
                     apt install python3-venv python3-pip), a Rust toolchain for maturin, and \
                     network access to PyPI on first use";

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}. {NEEDS}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{}{}\n{NEEDS}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
