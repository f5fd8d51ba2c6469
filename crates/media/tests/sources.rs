//! `data:` URLs and files confined to an allowed directory.

use std::path::Path;

use gemma_media::{decode_data_url, read_allowed_file, resolve_allowed_path, MediaError};

#[test]
fn data_urls_decode() {
    let (mime, bytes) = decode_data_url("data:image/png;base64,iVBORw0KGgo=", 100).unwrap();
    assert_eq!(mime, "image/png");
    assert_eq!(bytes, b"\x89PNG\r\n\x1a\n");
    // Upper-case scheme and type, parameters, no padding, line breaks, URL-safe alphabet.
    let (mime, bytes) = decode_data_url("DATA:Image/JPEG;name=x.jpg;base64,/9j/\n4A", 100).unwrap();
    assert_eq!(mime, "image/jpeg");
    assert_eq!(bytes, [0xff, 0xd8, 0xff, 0xe0]);
    let (_, bytes) = decode_data_url("data:image/jpeg;base64,_9j_4A", 100).unwrap();
    assert_eq!(bytes, [0xff, 0xd8, 0xff, 0xe0]);
    // No type: RFC 2397's default.
    assert_eq!(
        decode_data_url("data:;base64,aGk=", 100).unwrap(),
        ("text/plain".into(), b"hi".to_vec())
    );
}

#[test]
fn bad_data_urls_are_clear_errors() {
    let err = |url: &str| decode_data_url(url, 100).unwrap_err().to_string();
    assert!(err("http://example.com/cat.png").contains("does not start with \"data:\""));
    assert!(err("dat").contains("does not start"));
    assert!(err("data:image/png;base64").contains("no ','"));
    assert!(err("data:image/png,rawtext").contains("not base64"));
    assert!(err("data:image/png;base64,@@@@").contains("invalid base64"));
    assert!(err("data:image/png;base64,aGk=aGk=").contains("invalid base64"));
    assert!(err("data:im age/png;base64,aGk=").contains("not a MIME type"));
    assert!(err("data:a/b/c;base64,aGk=").contains("not a MIME type"));
    assert!(
        err(&format!("data:image/{};base64,aGk=", "x".repeat(5000))).contains("longer than 100")
    );
    // Multi-byte UTF-8 right after "data" must not split a character.
    assert!(err("dataé:x").contains("does not start"));
}

#[test]
fn data_url_size_is_checked_before_decoding() {
    let payload = "A".repeat(4_000_000); // 3 MB once decoded
    let url = format!("data:image/png;base64,{payload}");
    let err = decode_data_url(&url, 1_000_000).unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyBytes {
                limit: 1_000_000,
                ..
            }
        ),
        "{err}"
    );
    // Exactly at the limit passes, one byte over fails.
    assert_eq!(
        decode_data_url("data:x/y;base64,AAAA", 3).unwrap().1.len(),
        3
    );
    assert!(decode_data_url("data:x/y;base64,AAAAAA", 3).is_err());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gemma-media-src-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn paths_are_confined_to_the_allowed_directory() {
    let root = temp_dir("paths");
    let allowed = root.join("media");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::write(allowed.join("sub/cat.png"), b"cat").unwrap();
    std::fs::write(root.join("secret.txt"), b"secret").unwrap();

    // Relative to the allowed directory, absolute, and through `..` that stays inside.
    let inside = allowed.canonicalize().unwrap().join("sub/cat.png");
    assert_eq!(
        resolve_allowed_path(&allowed, Path::new("sub/cat.png")).unwrap(),
        inside
    );
    assert_eq!(
        resolve_allowed_path(&allowed, &allowed.join("sub/cat.png")).unwrap(),
        inside
    );
    assert_eq!(
        resolve_allowed_path(&allowed, Path::new("sub/../sub/cat.png")).unwrap(),
        inside
    );
    assert_eq!(
        read_allowed_file(&allowed, Path::new("sub/cat.png"), 10).unwrap(),
        b"cat"
    );

    // Escapes: `..`, absolute paths elsewhere, and symlinks (to a file or a directory) pointing out.
    let outside = |p: &Path| {
        matches!(
            resolve_allowed_path(&allowed, p),
            Err(MediaError::OutsideAllowedDir { .. })
        )
    };
    assert!(outside(Path::new("../secret.txt")));
    assert!(outside(&root.join("secret.txt")));
    assert!(outside(Path::new("/etc/hostname")) || !Path::new("/etc/hostname").exists());
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("secret.txt"), allowed.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&root, allowed.join("up")).unwrap();
        assert!(outside(Path::new("link.txt")));
        assert!(outside(Path::new("up/secret.txt")));
        assert!(read_allowed_file(&allowed, Path::new("link.txt"), 100).is_err());
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink(allowed.join("sub/cat.png"), allowed.join("alias.png")).unwrap();
        assert_eq!(
            read_allowed_file(&allowed, Path::new("alias.png"), 10).unwrap(),
            b"cat"
        );
    }
    // The allowed directory named through a symlink: paths under either name work.
    #[cfg(unix)]
    {
        let alias = root.join("media-alias");
        std::os::unix::fs::symlink(&allowed, &alias).unwrap();
        assert_eq!(
            resolve_allowed_path(&alias, &alias.join("sub/cat.png")).unwrap(),
            inside
        );
        assert_eq!(
            resolve_allowed_path(&alias, Path::new("sub/cat.png")).unwrap(),
            inside
        );
        assert!(matches!(
            resolve_allowed_path(&alias, &alias.join("../secret.txt")),
            Err(MediaError::OutsideAllowedDir { .. })
        ));
    }
    // A sibling whose name merely starts with the allowed one is outside ("media2" vs "media").
    std::fs::create_dir_all(root.join("media2")).unwrap();
    std::fs::write(root.join("media2/x.png"), b"x").unwrap();
    assert!(outside(&root.join("media2/x.png")));

    // Outside paths are refused by name, before the file system is asked: a missing file outside
    // gets the same answer as an existing one (no probing for files elsewhere).
    assert!(outside(&root.join("no-such-file")));
    assert!(outside(Path::new("../../../../no/such/file")));

    // Missing files, directories and oversized files are errors too.
    let err = resolve_allowed_path(&allowed, Path::new("nope.png")).unwrap_err();
    assert!(err.to_string().contains("nope.png"), "{err}");
    assert!(read_allowed_file(&allowed, Path::new("sub"), 10).is_err());
    let err = read_allowed_file(&allowed, Path::new("sub/cat.png"), 2).unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyBytes {
                size: 3,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
