//! Compiles csrc/jpeg_shim.c against the libjpeg headers that mozjpeg-sys built and exported.
use std::env;

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
    let include = env::var_os("DEP_JPEG_INCLUDE")
        .expect("mozjpeg-sys exports its include directories as DEP_JPEG_INCLUDE");
    let mut build = cc::Build::new();
    build.file("csrc/jpeg_shim.c").warnings(true);
    for dir in env::split_paths(&include) {
        build.include(dir);
    }
    build.compile("gemma_media_jpeg_shim");
}
