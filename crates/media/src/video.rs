//! Video as a list of still frames with timestamps: from a folder of images, an animated GIF or
//! WebP, or any file the `ffmpeg` command-line tool reads.
//!
//! Sampling rules, the same for every source:
//! * frames are taken at `fps` frames per second from the start (times 0, 1/fps, 2/fps, …), each
//!   the source frame shown at that time;
//! * when that would give more than `max_frames`, the `max_frames` sample times are instead
//!   spread evenly over the whole clip (`i · duration / max_frames`), so a long clip is summarised
//!   rather than cut short;
//! * with `keyframes`, a frame is then dropped when it hardly differs from the last frame kept
//!   (mean absolute difference of a 16×16 grey thumbnail below `keyframe_threshold` grey levels);
//!   the first frame is always kept.
//!
//! Frames are RGB8; transparency is dropped and image files are decoded as by [`decode_image`]
//! (the reference's file route). An animation is read twice — once for its frame delays, once to
//! keep the sampled frames — rather than held whole.
//!
//! Everything is bounded: each frame's size ([`ImageLimits`]), the pixels of all frames returned
//! ([`VideoLimits::max_total_pixels`]), the decoding work spent on an animation
//! ([`VideoLimits::max_decoded_pixels`]), the number of frames ([`MAX_FRAMES`]) and the time an
//! external tool may run ([`FfmpegTools::timeout`]).
//!
//! ffmpeg is run as a program with an argument list (never through a shell), on `file:<absolute
//! path>` with `-protocol_whitelist file`, and its frames are read as a stream of PPM images. Its
//! `fps` filter picks the frames; the clip's duration comes from `ffprobe` (when the container
//! does not give one, the frame cap cuts the clip instead of spreading the frames).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use image::codecs::gif::GifDecoder;
use image::codecs::webp::WebPDecoder;
use image::{AnimationDecoder, ImageDecoder, ImageFormat, RgbImage, RgbaImage};

use crate::decode::{decode_image, detect_format, map_image_error, ImageLimits};
use crate::error::MediaError;

/// One sampled frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub image: RgbImage,
    /// Seconds from the start of the clip.
    pub timestamp_secs: f64,
}

/// How frames are picked (see the module documentation for the exact rules).
#[derive(Clone, Debug, PartialEq)]
pub struct FrameSampling {
    /// Frames per second to take (default 1).
    pub fps: f64,
    /// At most this many frames (default 32); longer clips are sampled evenly over their length.
    pub max_frames: usize,
    /// Drop frames nearly identical to the last kept one (default off).
    pub keyframes: bool,
    /// Mean absolute grey-level difference (0–255) below which a frame counts as unchanged
    /// (default 8).
    pub keyframe_threshold: f32,
}

impl Default for FrameSampling {
    fn default() -> Self {
        FrameSampling {
            fps: 1.0,
            max_frames: 32,
            keyframes: false,
            keyframe_threshold: 8.0,
        }
    }
}

/// Bounds on video decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoLimits {
    /// Limits for each frame (its size and decoder allocations).
    pub frame: ImageLimits,
    /// Most pixels all returned frames may hold together (default 256 megapixels, 768 MB).
    pub max_total_pixels: u64,
    /// Most canvas pixels an animation may make us decode, all frames and both passes together
    /// (default 2 gigapixels): bounds the time spent on a GIF with a huge frame count.
    pub max_decoded_pixels: u64,
    /// Most files a frame folder may hold (default 100 000).
    pub max_folder_files: usize,
}

impl Default for VideoLimits {
    fn default() -> Self {
        VideoLimits {
            frame: ImageLimits::default(),
            max_total_pixels: 256_000_000,
            max_decoded_pixels: 2_000_000_000,
            max_folder_files: 100_000,
        }
    }
}

/// The command-line tools used for video files; override to point at specific binaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FfmpegTools {
    /// Program name or path of `ffmpeg` (default `ffmpeg`, looked up on PATH).
    pub ffmpeg: OsString,
    /// Program name or path of `ffprobe` (default `ffprobe`).
    pub ffprobe: OsString,
    /// Wall-clock limit for each run of a tool (default 120 s): a hostile or huge file cannot
    /// keep ffmpeg busy for ever; it is killed and the sampling fails.
    pub timeout: Duration,
}

impl Default for FfmpegTools {
    fn default() -> Self {
        FfmpegTools {
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Where frames come from.
#[derive(Clone, Debug)]
pub enum VideoSource {
    /// The image files of a folder in byte order of their names (zero-pad numbers: `f10` sorts
    /// before `f2`), shown one after the other at `frame_rate` frames per second. Hidden files
    /// (name starting with `.`) and sub-folders are skipped; any other undecodable file is an error.
    Folder { dir: PathBuf, frame_rate: f64 },
    /// An animated GIF or WebP in memory, timed by its frame delays (a delay of 10 ms or less
    /// counts as 100 ms, as browsers show it). A still image of any supported format is a
    /// one-frame clip.
    Animation(Vec<u8>),
    /// A file decoded by the `ffmpeg` CLI (needs `ffmpeg` and `ffprobe` on PATH).
    File { path: PathBuf, tools: FfmpegTools },
}

impl VideoSource {
    /// Picks the source for a path: a folder of frames (at 1 frame per second), an animated GIF
    /// or WebP or a still image read into memory (recognised by its bytes, whatever its name),
    /// else ffmpeg.
    /// `max_bytes` bounds the size of a file read into memory.
    pub fn open(path: &Path, max_bytes: u64) -> Result<VideoSource, MediaError> {
        let io_err = |source| MediaError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            return Ok(VideoSource::Folder {
                dir: path.to_owned(),
                frame_rate: 1.0,
            });
        }
        let mut head = [0u8; 16];
        let n = read_up_to(&mut std::fs::File::open(path).map_err(io_err)?, &mut head)
            .map_err(io_err)?;
        // Anything we decode ourselves (animated GIF/WebP, or a still image as a one-frame clip)
        // stays away from ffmpeg.
        if detect_format(&head[..n]).is_err() {
            return Ok(VideoSource::File {
                path: path.to_owned(),
                tools: FfmpegTools::default(),
            });
        }
        if meta.len() > max_bytes {
            return Err(MediaError::TooManyBytes {
                what: path.display().to_string(),
                size: meta.len(),
                limit: max_bytes,
            });
        }
        Ok(VideoSource::Animation(std::fs::read(path).map_err(io_err)?))
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Hard cap on [`FrameSampling::max_frames`], whatever the caller asks: the sample times are
/// planned up front.
pub const MAX_FRAMES: usize = 100_000;

/// Samples frames from `source` (see the module documentation for the rules).
pub fn sample_frames(
    source: &VideoSource,
    sampling: &FrameSampling,
    limits: &VideoLimits,
) -> Result<Vec<Frame>, MediaError> {
    if !(sampling.fps.is_finite() && sampling.fps > 0.0) {
        return Err(MediaError::Video(format!(
            "sampling rate must be above 0 fps, not {}",
            sampling.fps
        )));
    }
    if sampling.max_frames == 0 || sampling.max_frames > MAX_FRAMES {
        return Err(MediaError::Video(format!(
            "max_frames must be between 1 and {MAX_FRAMES}, not {}",
            sampling.max_frames
        )));
    }
    let mut budget = PixelBudget {
        used: 0,
        limit: limits.max_total_pixels,
    };
    let frames = match source {
        VideoSource::Folder { dir, frame_rate } => {
            sample_folder(dir, *frame_rate, sampling, limits, &mut budget)?
        }
        VideoSource::Animation(bytes) => sample_animation(bytes, sampling, limits, &mut budget)?,
        VideoSource::File { path, tools } => {
            sample_with_ffmpeg(path, tools, sampling, limits, &mut budget)?
        }
    };
    if frames.is_empty() {
        return Err(MediaError::Video("has no frames".into()));
    }
    Ok(if sampling.keyframes {
        keep_keyframes(frames, sampling.keyframe_threshold)
    } else {
        frames
    })
}

/// `mm:ss` for a timestamp (minutes keep counting past 59: `75:03`).
pub fn mmss(secs: f64) -> String {
    // NaN and negatives clamp to 0.
    let s = if secs > 0.0 { secs.floor() as u64 } else { 0 };
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// The sample times for a clip of `duration` seconds (see module docs).
fn sample_times(duration: f64, sampling: &FrameSampling) -> Vec<f64> {
    if !(duration.is_finite() && duration > 0.0) {
        return vec![0.0];
    }
    // Times i/fps strictly before the end; the small slack absorbs float noise at exact multiples.
    let at_rate = ((duration * sampling.fps - 1e-9).ceil() as usize).max(1);
    if at_rate <= sampling.max_frames {
        (0..at_rate).map(|i| i as f64 / sampling.fps).collect()
    } else {
        let n = sampling.max_frames;
        (0..n).map(|i| i as f64 * duration / n as f64).collect()
    }
}

/// Running total of the pixels held by the frames returned so far.
struct PixelBudget {
    used: u64,
    limit: u64,
}

impl PixelBudget {
    fn take(&mut self, img: &RgbImage) -> Result<(), MediaError> {
        self.used += u64::from(img.width()) * u64::from(img.height());
        if self.used > self.limit {
            return Err(MediaError::Video(format!(
                "frames would hold more than {} together; sample fewer frames",
                crate::error::human_pixels(self.limit)
            )));
        }
        Ok(())
    }
}

fn sample_folder(
    dir: &Path,
    frame_rate: f64,
    sampling: &FrameSampling,
    limits: &VideoLimits,
    budget: &mut PixelBudget,
) -> Result<Vec<Frame>, MediaError> {
    if !(frame_rate.is_finite() && frame_rate > 0.0) {
        return Err(MediaError::Video(format!(
            "folder frame rate must be above 0, not {frame_rate}"
        )));
    }
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| MediaError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") || !entry.path().is_file() {
            continue;
        }
        if files.len() == limits.max_folder_files {
            return Err(MediaError::Video(format!(
                "folder {} holds more than {} files",
                dir.display(),
                limits.max_folder_files
            )));
        }
        files.push(entry.path());
    }
    files.sort();
    if files.is_empty() {
        return Err(MediaError::Video(format!(
            "folder {} holds no image files",
            dir.display()
        )));
    }
    let duration = files.len() as f64 / frame_rate;
    let mut frames: Vec<Frame> = Vec::new();
    let mut previous: Option<(usize, RgbImage)> = None;
    for t in sample_times(duration, sampling) {
        // The frame shown at time t; the slack keeps k/frame_rate itself on frame k.
        let index = ((t * frame_rate + 1e-9).floor() as usize).min(files.len() - 1);
        let image = match &previous {
            // A rate above the folder's repeats a frame: reuse it rather than decode it again.
            Some((i, image)) if *i == index => image.clone(),
            _ => {
                let path = &files[index];
                let bytes = std::fs::read(path).map_err(io_err(path))?;
                decode_image(&bytes, &limits.frame)
                    .map_err(|e| MediaError::Video(format!("frame {}: {e}", path.display())))?
            }
        };
        budget.take(&image)?;
        previous = Some((index, image.clone()));
        frames.push(Frame {
            image,
            timestamp_secs: t,
        });
    }
    Ok(frames)
}

/// An animation opened for one pass over its frames.
enum Animation<'a> {
    Frames(image::Frames<'a>, (u32, u32)),
    Still(RgbImage),
}

fn open_animation<'a>(bytes: &'a [u8], limits: &ImageLimits) -> Result<Animation<'a>, MediaError> {
    let format = detect_format(bytes)?;
    let image_limits = limits.to_image_limits();
    let map = |e| map_image_error(e, format, "animation", limits.max_alloc_bytes);
    match format {
        ImageFormat::Gif => {
            let mut decoder = GifDecoder::new(Cursor::new(bytes)).map_err(map)?;
            let (w, h) = decoder.dimensions();
            limits.check(w, h)?;
            // Each frame's own buffer is checked against the allocation cap by the decoder.
            decoder.set_limits(image_limits).map_err(map)?;
            Ok(Animation::Frames(decoder.into_frames(), (w, h)))
        }
        ImageFormat::WebP => {
            let mut decoder = WebPDecoder::new(Cursor::new(bytes)).map_err(map)?;
            let (w, h) = decoder.dimensions();
            limits.check(w, h)?;
            if !decoder.has_animation() {
                return Ok(Animation::Still(decode_image(bytes, limits)?));
            }
            decoder.set_limits(image_limits).map_err(map)?;
            Ok(Animation::Frames(decoder.into_frames(), (w, h)))
        }
        _ => Ok(Animation::Still(decode_image(bytes, limits)?)),
    }
}

/// Frame delay in whole milliseconds as browsers show it: 10 ms or less means 100 ms. Integer
/// milliseconds keep the timeline exact however many frames are added up.
fn shown_delay_ms(frame: &image::Frame) -> u64 {
    let (num, den) = frame.delay().numer_denom_ms();
    let ms = if den == 0 {
        0
    } else {
        u64::from(num) / u64::from(den)
    };
    if ms <= 10 {
        100
    } else {
        ms
    }
}

/// Drops the alpha channel, as PIL's `convert("RGB")` does.
fn rgba_to_rgb(rgba: &RgbaImage) -> RgbImage {
    let data = rgba
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(rgba.width(), rgba.height(), data).expect("3 bytes per pixel")
}

fn sample_animation(
    bytes: &[u8],
    sampling: &FrameSampling,
    limits: &VideoLimits,
    budget: &mut PixelBudget,
) -> Result<Vec<Frame>, MediaError> {
    let format = detect_format(bytes)?;
    let alloc = limits.frame.max_alloc_bytes;
    let mut work = 0u64;
    // Counts decoding work per canvas, so that a huge frame count cannot keep us busy forever.
    let mut charge = |(w, h): (u32, u32)| -> Result<(), MediaError> {
        work += u64::from(w) * u64::from(h);
        if work > limits.max_decoded_pixels {
            return Err(MediaError::Video(format!(
                "animation is too long: decoding it would take more than {} of frames",
                crate::error::human_pixels(limits.max_decoded_pixels)
            )));
        }
        Ok(())
    };

    // Pass 1: the timeline (frame delays), decoding each frame and dropping it at once.
    let mut delays = Vec::new();
    match open_animation(bytes, &limits.frame)? {
        Animation::Still(image) => {
            budget.take(&image)?;
            return Ok(vec![Frame {
                image,
                timestamp_secs: 0.0,
            }]);
        }
        Animation::Frames(frames, canvas) => {
            for frame in frames {
                charge(canvas)?;
                let frame = frame.map_err(|e| map_image_error(e, format, "animation", alloc))?;
                delays.push(shown_delay_ms(&frame));
            }
        }
    }
    if delays.is_empty() {
        return Err(MediaError::Video("animation has no frames".into()));
    }
    let times = sample_times(delays.iter().sum::<u64>() as f64 / 1000.0, sampling);

    // Pass 2: decode again, keeping only the frames shown at the sample times.
    let Animation::Frames(frames, canvas) = open_animation(bytes, &limits.frame)? else {
        unreachable!("the same bytes opened as an animation a moment ago")
    };
    let mut out = Vec::with_capacity(times.len());
    let mut next = times.iter().copied().peekable();
    let mut start_ms = 0u64;
    for (frame, delay) in frames.zip(&delays) {
        if next.peek().is_none() {
            break;
        }
        charge(canvas)?;
        let frame = frame.map_err(|e| map_image_error(e, format, "animation", alloc))?;
        let end = (start_ms + delay) as f64 / 1000.0;
        let mut rgb = None;
        while let Some(&t) = next.peek() {
            if t >= end {
                break;
            }
            let image = rgb
                .get_or_insert_with(|| rgba_to_rgb(frame.buffer()))
                .clone();
            budget.take(&image)?;
            out.push(Frame {
                image,
                timestamp_secs: t,
            });
            next.next();
        }
        start_ms += delay;
    }
    Ok(out)
}

/// A running ffmpeg or ffprobe: its stdout for us to read, its stderr collected in the
/// background (so it never blocks on a full pipe) and a watchdog that kills it at the deadline.
struct ToolRun {
    tool: String,
    path: PathBuf,
    timeout: Duration,
    child: Arc<Mutex<Child>>,
    stdout: BufReader<ChildStdout>,
    stderr: JoinHandle<String>,
    stop_watchdog: mpsc::Sender<()>,
    watchdog: JoinHandle<bool>,
}

impl ToolRun {
    fn start(
        tool: &OsStr,
        args: &[OsString],
        path: &Path,
        timeout: Duration,
    ) -> Result<ToolRun, MediaError> {
        let name = tool.to_string_lossy().into_owned();
        // Arguments go straight to the program: no shell, so no quoting or injection issues.
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => MediaError::ToolMissing {
                    tool: name.clone(),
                    path: path.to_owned(),
                },
                _ => MediaError::ToolFailed {
                    tool: name.clone(),
                    path: path.to_owned(),
                    message: e.to_string(),
                },
            })?;
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            // Keep the last few KiB: ffmpeg's final lines say what went wrong.
            let mut text = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut buf) {
                text.extend_from_slice(&buf[..n]);
                if text.len() > 8192 {
                    text.drain(..text.len() - 4096);
                }
            }
            String::from_utf8_lossy(&text).trim().to_owned()
        });
        let child = Arc::new(Mutex::new(child));
        let (stop_watchdog, stop) = mpsc::channel::<()>();
        let watched = Arc::clone(&child);
        let watchdog = std::thread::spawn(move || match stop.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(mut child) = watched.lock() {
                    let _ = child.kill();
                }
                true
            }
            _ => false,
        });
        Ok(ToolRun {
            tool: name,
            path: path.to_owned(),
            timeout,
            child,
            stdout,
            stderr,
            stop_watchdog,
            watchdog,
        })
    }

    fn failed(&self, message: String) -> MediaError {
        MediaError::ToolFailed {
            tool: self.tool.clone(),
            path: self.path.clone(),
            message,
        }
    }

    /// Waits for the process to end — after killing it if `kill` (when we stopped reading early)
    /// — and returns its exit status and stderr; an error if the watchdog had to stop it.
    fn finish(self, kill: bool) -> Result<(ExitStatus, String), MediaError> {
        drop(self.stdout); // a writer blocked on a full pipe now gets EPIPE
        let status = loop {
            // Poll rather than block in `wait`, so that the watchdog can take the lock to kill.
            let polled = match self.child.lock() {
                Ok(mut child) => {
                    if kill {
                        let _ = child.kill();
                    }
                    child.try_wait()
                }
                Err(_) => Ok(None),
            };
            match polled {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => break Err(e),
            }
        };
        let _ = self.stop_watchdog.send(());
        let timed_out = self.watchdog.join().unwrap_or(false);
        let stderr = self.stderr.join().unwrap_or_default();
        let message = |m: String| MediaError::ToolFailed {
            tool: self.tool.clone(),
            path: self.path.clone(),
            message: m,
        };
        if timed_out {
            return Err(message(format!(
                "still running after {:.1} s, stopped",
                self.timeout.as_secs_f64()
            )));
        }
        let status = status.map_err(|e| message(e.to_string()))?;
        Ok((status, stderr))
    }
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// ffmpeg's name for a local file. The `file:` prefix stops ffmpeg from reading a name such as
/// `http://…`, `concat:…` or `-i` as a protocol or an option; `-protocol_whitelist file` (on
/// every call) also stops playlists inside a file from reaching the network.
fn ffmpeg_input(path: &Path) -> Result<OsString, MediaError> {
    let abs = std::path::absolute(path).map_err(|source| MediaError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut s = OsString::from("file:");
    s.push(abs.as_os_str());
    Ok(s)
}

/// Duration in seconds from `ffprobe`, `None` when the container does not say.
fn probe_duration(path: &Path, tools: &FfmpegTools) -> Result<Option<f64>, MediaError> {
    let mut args = os_args(&[
        "-v",
        "error",
        "-protocol_whitelist",
        "file",
        "-show_entries",
        "format=duration",
        "-of",
        "default=noprint_wrappers=1:nokey=1",
    ]);
    args.push(ffmpeg_input(path)?);
    let mut run = ToolRun::start(&tools.ffprobe, &args, path, tools.timeout)?;
    let mut out = Vec::new();
    // The answer is one short line; anything more is drained and ignored.
    let read = (&mut run.stdout)
        .take(4096)
        .read_to_end(&mut out)
        .and_then(|_| std::io::copy(&mut run.stdout, &mut std::io::sink()));
    if let Err(e) = read {
        let err = run.failed(e.to_string());
        run.finish(true)?;
        return Err(err);
    }
    let (status, stderr) = run.finish(false)?;
    if !status.success() {
        let message = if stderr.is_empty() {
            status.to_string()
        } else {
            stderr
        };
        return Err(MediaError::ToolFailed {
            tool: tools.ffprobe.to_string_lossy().into_owned(),
            path: path.to_owned(),
            message,
        });
    }
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|d| d.is_finite() && *d > 0.0))
}

fn sample_with_ffmpeg(
    path: &Path,
    tools: &FfmpegTools,
    sampling: &FrameSampling,
    limits: &VideoLimits,
    budget: &mut PixelBudget,
) -> Result<Vec<Frame>, MediaError> {
    let duration = probe_duration(path, tools)?;
    // Spread max_frames over the whole clip when the requested rate would give more. Without a
    // known duration the rate stays and the frame cap cuts the clip instead.
    let rate = match duration {
        Some(d) if d * sampling.fps > sampling.max_frames as f64 => sampling.max_frames as f64 / d,
        _ => sampling.fps,
    };
    let mut args = os_args(&[
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-i",
    ]);
    args.push(ffmpeg_input(path)?);
    args.extend(os_args(&[
        "-map",
        "0:v:0",
        "-vf",
        &format!("fps={rate}"),
        "-frames:v",
        &sampling.max_frames.to_string(),
        "-an",
        "-sn",
        "-dn",
        // PPM frames carry their own size, so rotation metadata or a mid-stream size change
        // cannot desynchronise us the way a raw stream of guessed size would.
        "-f",
        "image2pipe",
        "-c:v",
        "ppm",
        "-",
    ]));
    let mut run = ToolRun::start(&tools.ffmpeg, &args, path, tools.timeout)?;
    let mut frames = Vec::new();
    let read = (|| -> Result<(), MediaError> {
        while frames.len() < sampling.max_frames {
            let header = read_ppm_header(&mut run.stdout)
                .map_err(|m| run.failed(format!("bad output: {m}")))?;
            let Some((w, h)) = header else { break };
            limits.frame.check(w, h)?;
            let mut data = vec![0u8; w as usize * h as usize * 3];
            run.stdout
                .read_exact(&mut data)
                .map_err(|_| run.failed("output ended inside a frame".into()))?;
            let image = RgbImage::from_raw(w, h, data).expect("sized above");
            budget.take(&image)?;
            frames.push(Frame {
                image,
                timestamp_secs: frames.len() as f64 / rate,
            });
        }
        Ok(())
    })();
    let (status, stderr) = run.finish(read.is_err() || frames.len() == sampling.max_frames)?;
    read?;
    if frames.is_empty() {
        let message = if !status.success() && !stderr.is_empty() {
            stderr
        } else if !status.success() {
            status.to_string()
        } else {
            "no video frames in the file".into()
        };
        return Err(MediaError::ToolFailed {
            tool: tools.ffmpeg.to_string_lossy().into_owned(),
            path: path.to_owned(),
            message,
        });
    }
    Ok(frames)
}

/// The soundtrack of a video as 16 kHz mono samples, decoded by the `ffmpeg` CLI (first audio
/// stream, channels mixed down and resampled by ffmpeg); `Ok(None)` when the source has no sound:
/// a folder of frames, an animation, or a file without an audio stream. At most
/// `limits.max_seconds` are read (the rest of a longer soundtrack is left out, as the frames of
/// a long clip are spread rather than all kept); `limits.max_bytes` bounds the PCM read.
pub fn soundtrack(
    source: &VideoSource,
    limits: &crate::AudioLimits,
) -> Result<Option<crate::Audio>, MediaError> {
    let VideoSource::File { path, tools } = source else {
        return Ok(None);
    };
    limits.validate()?;
    let max_bytes = ((limits.max_seconds * 16_000.0) as u64 * 2).min(limits.max_bytes);
    let mut args = os_args(&[
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-i",
    ]);
    args.push(ffmpeg_input(path)?);
    args.extend(os_args(&[
        // The `?` makes a file without sound a success with empty output, not an error.
        "-map", "0:a:0?", "-vn", "-sn", "-dn", "-ac", "1", "-ar", "16000", "-f", "s16le", "-",
    ]));
    let mut run = ToolRun::start(&tools.ffmpeg, &args, path, tools.timeout)?;
    let mut pcm = Vec::new();
    let read = (&mut run.stdout).take(max_bytes).read_to_end(&mut pcm);
    let cut = pcm.len() as u64 >= max_bytes;
    if let Err(e) = read {
        let err = run.failed(e.to_string());
        run.finish(true)?;
        return Err(err);
    }
    let (status, stderr) = run.finish(cut)?;
    // ffmpeg refuses to write an output without streams: that is a file without sound.
    if !cut && !status.success() && pcm.is_empty() && stderr.contains("does not contain any stream")
    {
        return Ok(None);
    }
    if !cut && !status.success() {
        return Err(MediaError::ToolFailed {
            tool: tools.ffmpeg.to_string_lossy().into_owned(),
            path: path.to_owned(),
            message: if stderr.is_empty() {
                status.to_string()
            } else {
                stderr
            },
        });
    }
    pcm.truncate(pcm.len() / 2 * 2);
    if pcm.is_empty() {
        return Ok(None);
    }
    crate::pcm16_to_audio(&pcm, 16_000, 1, limits).map(Some)
}

/// Reads a binary PPM (`P6`) header; `Ok(None)` at a clean end of stream.
fn read_ppm_header(r: &mut impl BufRead) -> Result<Option<(u32, u32)>, String> {
    if r.fill_buf().map_err(|e| e.to_string())?.is_empty() {
        return Ok(None);
    }
    let mut fields = Vec::with_capacity(4);
    while fields.len() < 4 {
        let mut token = Vec::new();
        loop {
            let mut byte = [0u8];
            if r.read(&mut byte).map_err(|e| e.to_string())? == 0 {
                return Err("truncated frame header".into());
            }
            match byte[0] {
                b'#' if token.is_empty() => {
                    let mut comment = Vec::new();
                    r.read_until(b'\n', &mut comment)
                        .map_err(|e| e.to_string())?;
                }
                c if c.is_ascii_whitespace() => {
                    if !token.is_empty() {
                        break;
                    }
                }
                c if token.len() < 16 => token.push(c),
                _ => return Err("malformed frame header".into()),
            }
        }
        fields.push(String::from_utf8_lossy(&token).into_owned());
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(format!(
            "expected an 8-bit P6 frame, got {} with maximum {}",
            fields[0], fields[3]
        ));
    }
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("bad frame size {s:?}"))
    };
    Ok(Some((num(&fields[1])?, num(&fields[2])?)))
}

/// Longest side of the grey thumbnail compared by keyframe detection.
const THUMB: usize = 16;

/// A grid of mean grey levels (16×16, or smaller for tinier frames so that no cell is empty):
/// cheap to compute, and blind to noise and small motions.
#[derive(PartialEq)]
struct Thumbnail {
    grid: (usize, usize),
    cells: Vec<f32>,
}

impl Thumbnail {
    fn new(img: &RgbImage) -> Thumbnail {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (gw, gh) = (THUMB.min(w), THUMB.min(h));
        let mut sum = vec![0f64; gw * gh];
        let mut count = vec![0u32; gw * gh];
        for (y, row) in img.as_raw().chunks_exact(w * 3).enumerate() {
            let base = y * gh / h * gw;
            for (x, p) in row.chunks_exact(3).enumerate() {
                let cell = base + x * gw / w;
                sum[cell] += 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
                count[cell] += 1;
            }
        }
        let cells = sum
            .iter()
            .zip(&count)
            .map(|(s, &c)| (s / c as f64) as f32)
            .collect();
        Thumbnail {
            grid: (gw, gh),
            cells,
        }
    }

    /// Mean absolute grey-level difference; frames of different shapes differ completely.
    fn difference(&self, other: &Thumbnail) -> f32 {
        if self.grid != other.grid {
            return f32::INFINITY;
        }
        let total: f32 = self
            .cells
            .iter()
            .zip(&other.cells)
            .map(|(a, b)| (a - b).abs())
            .sum();
        total / self.cells.len() as f32
    }
}

/// Keeps the first frame and every frame that differs enough from the last one kept.
fn keep_keyframes(frames: Vec<Frame>, threshold: f32) -> Vec<Frame> {
    let mut kept: Vec<Frame> = Vec::new();
    let mut last: Option<Thumbnail> = None;
    for frame in frames {
        let thumb = Thumbnail::new(&frame.image);
        if last
            .as_ref()
            .is_none_or(|l| thumb.difference(l) >= threshold)
        {
            last = Some(thumb);
            kept.push(frame);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmss_formats() {
        assert_eq!(mmss(0.0), "00:00");
        assert_eq!(mmss(59.99), "00:59");
        assert_eq!(mmss(61.0), "01:01");
        assert_eq!(mmss(4503.0), "75:03");
        assert_eq!(mmss(-3.0), "00:00");
        assert_eq!(mmss(f64::NAN), "00:00");
    }

    #[test]
    fn sample_times_rate_then_spread() {
        let s = FrameSampling {
            fps: 2.0,
            max_frames: 10,
            ..Default::default()
        };
        assert_eq!(sample_times(2.0, &s), vec![0.0, 0.5, 1.0, 1.5]);
        assert_eq!(sample_times(2.1, &s), vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        // 100 s at 2 fps would be 200 frames: 10 spread over the whole clip instead.
        let t = sample_times(100.0, &s);
        assert_eq!(t.len(), 10);
        assert_eq!(t[1], 10.0);
        assert_eq!(t[9], 90.0);
        assert_eq!(sample_times(0.0, &s), vec![0.0]);
    }

    #[test]
    fn ppm_header_parsing() {
        let mut ok = Cursor::new(b"P6\n# made by ffmpeg\n4 3\n255\nrest".to_vec());
        assert_eq!(read_ppm_header(&mut ok).unwrap(), Some((4, 3)));
        assert_eq!(read_ppm_header(&mut Cursor::new(Vec::new())).unwrap(), None);
        assert!(read_ppm_header(&mut Cursor::new(b"P5 4 3 255 ".to_vec())).is_err());
        assert!(read_ppm_header(&mut Cursor::new(b"P6 4".to_vec())).is_err());
        assert!(
            read_ppm_header(&mut Cursor::new(b"P6 99999999999999999999 3 255 ".to_vec())).is_err()
        );
    }
}
