//! Video sampling from folders, animated GIFs and (when installed) ffmpeg.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use gemma_media::{
    mmss, sample_frames, FfmpegTools, FrameSampling, MediaError, RgbImage, VideoLimits, VideoSource,
};

fn flat(v: u8) -> RgbImage {
    RgbImage::from_pixel(16, 12, image::Rgb([v, v, v]))
}

fn stamps(frames: &[gemma_media::Frame]) -> Vec<f64> {
    frames.iter().map(|f| f.timestamp_secs).collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gemma-media-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn folder_frames_in_name_order_with_timestamps() {
    let dir = temp_dir("folder");
    // Written out of order, with a hidden file and a sub-folder that must be skipped.
    for i in [3u8, 0, 2, 1, 4] {
        std::fs::write(dir.join(format!("frame_{i:03}.png")), png(&flat(i * 50))).unwrap();
    }
    std::fs::write(dir.join(".DS_Store"), b"junk").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();

    let source = VideoSource::Folder {
        dir: dir.clone(),
        frame_rate: 2.0,
    }; // 2.5 s clip
    let frames =
        sample_frames(&source, &FrameSampling::default(), &VideoLimits::default()).unwrap();
    // 1 fps: times 0, 1, 2 -> files 0, 2, 4.
    assert_eq!(stamps(&frames), vec![0.0, 1.0, 2.0]);
    let grey: Vec<u8> = frames
        .iter()
        .map(|f| f.image.get_pixel(0, 0).0[0])
        .collect();
    assert_eq!(grey, vec![0, 100, 200]);

    // A cap below the count spreads the frames over the whole clip: times 0, 1.25.
    let two = FrameSampling {
        fps: 4.0,
        max_frames: 2,
        ..Default::default()
    };
    let frames = sample_frames(&source, &two, &VideoLimits::default()).unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 1.25]);
    assert_eq!(frames[1].image.get_pixel(0, 0).0[0], 100); // file 2 is shown from 1.0 to 1.5 s

    // A broken file names itself.
    std::fs::write(dir.join("frame_002.png"), b"not an image").unwrap();
    let err =
        sample_frames(&source, &FrameSampling::default(), &VideoLimits::default()).unwrap_err();
    assert!(err.to_string().contains("frame_002.png"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gif_frames_follow_their_delays() {
    // Frames of 0.5 s, 1.5 s and 1 s: a 3 s clip.
    let bytes = gif(&[(flat(0), 500), (flat(100), 1500), (flat(200), 1000)]);
    let sampling = FrameSampling {
        fps: 2.0,
        ..Default::default()
    };
    let frames = sample_frames(
        &VideoSource::Animation(bytes.clone()),
        &sampling,
        &VideoLimits::default(),
    )
    .unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let grey: Vec<u8> = frames
        .iter()
        .map(|f| f.image.get_pixel(3, 3).0[0])
        .collect();
    assert_eq!(grey, vec![0, 100, 100, 100, 200, 200]);
    assert_eq!(mmss(frames[5].timestamp_secs), "00:02");

    // Keyframes: the repeated frames go, each change stays.
    let key = FrameSampling {
        keyframes: true,
        ..sampling
    };
    let frames = sample_frames(
        &VideoSource::Animation(bytes),
        &key,
        &VideoLimits::default(),
    )
    .unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 0.5, 2.0]);
}

#[test]
fn keyframe_threshold_compares_with_the_last_kept_frame() {
    // A slow fade: each step (4 levels) is below the threshold of 8, but the drift adds up, so
    // a frame is kept each time it is 8 levels away from the last kept one. PNG frames in a
    // folder keep the grey levels exact (a GIF palette would not).
    let dir = temp_dir("fade");
    for i in 0..6u8 {
        std::fs::write(dir.join(format!("{i}.png")), png(&flat(100 + 4 * i))).unwrap();
    }
    let sampling = FrameSampling {
        keyframes: true,
        keyframe_threshold: 8.0,
        ..Default::default()
    };
    let source = VideoSource::Folder {
        dir: dir.clone(),
        frame_rate: 1.0,
    };
    let out = sample_frames(&source, &sampling, &VideoLimits::default()).unwrap();
    assert_eq!(stamps(&out), vec![0.0, 2.0, 4.0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gif_with_100k_frames_is_streamed_and_spread() {
    // 100 000 frames of 0.1 s (10 000 s); the colour changes every 1000 frames.
    let bytes = tiny_gif((0..100_000u32).map(|k| (((k / 1000) % 4) as u8, 10)));
    let sampling = FrameSampling {
        fps: 1.0,
        max_frames: 7,
        ..Default::default()
    };
    // Holding every frame would break this budget: only the sampled ones may be kept.
    let limits = VideoLimits {
        max_total_pixels: 1000,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let frames = sample_frames(&VideoSource::Animation(bytes), &sampling, &limits).unwrap();
    eprintln!("100k-frame GIF sampled in {:?}", start.elapsed());
    assert_eq!(frames.len(), 7);
    let palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]];
    for (i, f) in frames.iter().enumerate() {
        let t = i as f64 * 10_000.0 / 7.0;
        assert!((f.timestamp_secs - t).abs() < 1e-6);
        let k = (t * 10.0).floor() as usize; // the frame shown at t
        assert_eq!(
            f.image.get_pixel(0, 0).0,
            palette[(k / 1000) % 4],
            "frame {i}"
        );
    }
    // The decoding budget stops an animation that would take too long to scan.
    let bytes = tiny_gif((0..5_000u32).map(|_| (1, 10)));
    let tight = VideoLimits {
        max_decoded_pixels: 1_000,
        ..Default::default()
    };
    let err = sample_frames(&VideoSource::Animation(bytes), &sampling, &tight).unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
}

#[test]
fn animated_webp_frames_follow_their_durations() {
    // Made with PIL: 16x12 frames, red 200 ms, green 300 ms, blue 500 ms (lossless, 188 bytes).
    let bytes = include_bytes!("data/animated_3frames.webp").to_vec();
    let sampling = FrameSampling {
        fps: 4.0,
        ..Default::default()
    };
    let frames = sample_frames(
        &VideoSource::Animation(bytes.clone()),
        &sampling,
        &VideoLimits::default(),
    )
    .unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 0.25, 0.5, 0.75]);
    // image-webp blends even opaque frames onto the canvas, with libwebp's approximate integer
    // arithmetic (libwebp itself skips opaque pixels): 200 comes back as 199. Allow one level.
    let expect = [[200, 0, 0], [0, 200, 0], [0, 0, 200], [0, 0, 200]];
    for (frame, want) in frames.iter().zip(expect) {
        let got = frame.image.get_pixel(5, 5).0;
        assert!(
            got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 1),
            "{got:?} vs {want:?}"
        );
    }
    // As a still image it is its first frame.
    let first = gemma_media::decode_image(&bytes, &gemma_media::ImageLimits::default()).unwrap();
    assert_eq!(first.get_pixel(0, 0).0, [200, 0, 0]);
}

#[test]
fn still_image_is_a_one_frame_clip() {
    let frames = sample_frames(
        &VideoSource::Animation(png(&flat(9))),
        &FrameSampling::default(),
        &VideoLimits::default(),
    )
    .unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].timestamp_secs, 0.0);
}

#[test]
fn bad_sampling_requests_are_refused() {
    let src = VideoSource::Animation(png(&flat(9)));
    for bad in [
        FrameSampling {
            fps: 0.0,
            ..Default::default()
        },
        FrameSampling {
            max_frames: 0,
            ..Default::default()
        },
        FrameSampling {
            max_frames: usize::MAX,
            ..Default::default()
        },
        FrameSampling {
            fps: f64::NAN,
            ..Default::default()
        },
    ] {
        let err = sample_frames(&src, &bad, &VideoLimits::default()).unwrap_err();
        assert!(matches!(err, MediaError::Video(_)), "{err}");
    }
}

#[test]
fn missing_ffmpeg_is_named_in_the_error() {
    let dir = temp_dir("noffmpeg");
    let clip = dir.join("clip.mp4");
    std::fs::write(&clip, b"\0\0\0\x18ftypmp42").unwrap();
    // VideoSource::open hands non-animation files to ffmpeg.
    assert!(matches!(
        VideoSource::open(&clip, 1 << 20).unwrap(),
        VideoSource::File { .. }
    ));
    let tools = FfmpegTools {
        ffmpeg: "gemma-no-such-ffmpeg".into(),
        ffprobe: "gemma-no-such-ffprobe".into(),
        ..Default::default()
    };
    let source = VideoSource::File { path: clip, tools };
    let err =
        sample_frames(&source, &FrameSampling::default(), &VideoLimits::default()).unwrap_err();
    assert!(matches!(err, MediaError::ToolMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`gemma-no-such-ffprobe` was not found on PATH"),
        "{msg}"
    );
    assert!(msg.contains("clip.mp4"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn a_hanging_tool_is_stopped_at_the_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("hang");
    // A stand-in for ffprobe that never answers (and keeps its pipes open).
    let tool = dir.join("slow-ffprobe");
    std::fs::write(&tool, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let clip = dir.join("clip.mp4");
    std::fs::write(&clip, b"whatever").unwrap();
    let tools = FfmpegTools {
        ffprobe: tool.into(),
        timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let err = sample_frames(
        &VideoSource::File { path: clip, tools },
        &FrameSampling::default(),
        &VideoLimits::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("still running after 0.3 s"),
        "{err}"
    );
    assert!(start.elapsed().as_secs() < 10, "took {:?}", start.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn have_ffmpeg() -> bool {
    let ok = |tool: &str| {
        Command::new(tool)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ok("ffmpeg") && ok("ffprobe")
}

#[test]
fn ffmpeg_file_is_sampled_when_ffmpeg_is_installed() {
    if !have_ffmpeg() {
        eprintln!("ffmpeg/ffprobe not on PATH: skipping the ffmpeg decoding test");
        return;
    }
    let dir = temp_dir("ffmpeg");
    // A 3 s, 10 fps test pattern; a name with a space and a leading dash must not confuse ffmpeg.
    let clip = dir.join("-my clip.mkv");
    let status = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=3:size=64x48:rate=10",
            "-c:v",
            "ffv1",
        ])
        .arg(&clip)
        .status()
        .unwrap();
    assert!(status.success());
    let source = VideoSource::open(&clip, 1 << 20).unwrap();
    assert!(matches!(source, VideoSource::File { .. }));

    let frames =
        sample_frames(&source, &FrameSampling::default(), &VideoLimits::default()).unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 1.0, 2.0]);
    assert!(frames.iter().all(|f| f.image.dimensions() == (64, 48)));
    // testsrc moves over time: consecutive samples differ.
    assert_ne!(frames[0].image, frames[1].image);

    // 3 s at 2 fps is 6 frames; capped at 4 they spread over the clip (every 0.75 s).
    let capped = FrameSampling {
        fps: 2.0,
        max_frames: 4,
        ..Default::default()
    };
    let frames = sample_frames(&source, &capped, &VideoLimits::default()).unwrap();
    assert_eq!(stamps(&frames), vec![0.0, 0.75, 1.5, 2.25]);

    // Garbage with a video name is ffmpeg's error, passed on.
    let junk = dir.join("junk.mp4");
    std::fs::write(&junk, b"this is not a video at all").unwrap();
    let err = sample_frames(
        &VideoSource::open(&junk, 1 << 20).unwrap(),
        &capped,
        &VideoLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, MediaError::ToolFailed { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn open_recognises_animations_by_content() {
    let dir = temp_dir("open");
    let path = dir.join("looks_like.mp4"); // the name lies; the bytes decide
    std::fs::write(&path, gif(&[(flat(1), 100), (flat(2), 100)])).unwrap();
    assert!(matches!(
        VideoSource::open(&path, 1 << 20).unwrap(),
        VideoSource::Animation(_)
    ));
    assert!(matches!(
        VideoSource::open(&dir, 1 << 20).unwrap(),
        VideoSource::Folder { .. }
    ));
    assert!(matches!(
        VideoSource::open(&path, 10).unwrap_err(),
        MediaError::TooManyBytes { .. }
    ));
    assert!(VideoSource::open(Path::new("/nonexistent/clip.gif"), 1 << 20).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
