//! From an RGB image to the model's `pixel_values`, and Gemma 3's pan-and-scan crops.

use image::RgbImage;

use crate::resize::resize_bilinear_antialias;

/// How an image becomes `pixel_values`: resize to `size`×`size` (aspect ratio not kept), then
/// `(x/255 - mean) / std` per channel, channels first.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Side of the square the image is resized to (Gemma 3: 896, Gemma 3n: 768; tiny test
    /// models use their config's `image_size`).
    pub size: u32,
    /// Per-channel mean (R, G, B), in 0..1 units.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B), in 0..1 units.
    pub std: [f32; 3],
}

impl Preprocess {
    /// Gemma 3 (4B, 12B, 27B): 896², mean = std = 0.5, so values lie in [-1, 1].
    pub fn gemma3() -> Self {
        Self::gemma3_with_size(896)
    }

    /// Gemma 3's normalisation at another size (from a model's `image_size`).
    pub fn gemma3_with_size(size: u32) -> Self {
        Preprocess {
            size,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// Gemma 3n (E2B, E4B): 768², rescale to [0, 1] only.
    pub fn gemma3n() -> Self {
        Self::gemma3n_with_size(768)
    }

    /// Gemma 3n's rescale-only preprocessing at another size.
    pub fn gemma3n_with_size(size: u32) -> Self {
        Preprocess {
            size,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    /// The `f32` value of each byte level, per channel, computed as the reference does:
    /// with normalisation transformers fuses the two steps into `(x - 255·mean) / (255·std)`;
    /// without it (mean 0, std 1) it multiplies by `1/255`. Both in `f32`, so ours is bit-equal.
    fn lookup(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let rescale_only = self.mean[c] == 0.0 && self.std[c] == 1.0;
            let (m, s) = (self.mean[c] * 255.0, self.std[c] * 255.0);
            for (v, out) in table.iter_mut().enumerate() {
                let x = v as f32;
                *out = if rescale_only {
                    x * (1.0f64 / 255.0) as f32
                } else {
                    (x - m) / s
                };
            }
        }
        lut
    }
}

/// Resizes `img` to `pre.size`² as the reference does and returns `[3, size, size]` values,
/// channels first (R plane, then G, then B), row-major.
pub fn pixel_values(img: &RgbImage, pre: &Preprocess) -> Vec<f32> {
    let resized = resize_bilinear_antialias(img, pre.size, pre.size);
    let lut = pre.lookup();
    let plane = pre.size as usize * pre.size as usize;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in resized.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
    out
}

/// Gemma 3's pan-and-scan settings (`pan_and_scan_*` in `preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct PanAndScan {
    /// No crop may be narrower or shorter than this (default 256).
    pub min_crop_size: u32,
    /// At most this many crops (default 4).
    pub max_num_crops: u32,
    /// Only images at least this elongated (long side / short side) are cropped (default 1.2).
    pub min_ratio_to_activate: f64,
}

impl Default for PanAndScan {
    fn default() -> Self {
        PanAndScan {
            min_crop_size: 256,
            max_num_crops: 4,
            min_ratio_to_activate: 1.2,
        }
    }
}

impl PanAndScan {
    /// The crop boxes `(x, y, width, height)` for a `width`×`height` image, left to right then
    /// top to bottom; empty when pan-and-scan does not apply. Follows transformers'
    /// `Gemma3ImageProcessor.pan_and_scan` step for step, including its float arithmetic.
    pub fn crop_boxes(&self, width: u32, height: u32) -> Vec<(u32, u32, u32, u32)> {
        if width == 0 || height == 0 {
            return Vec::new();
        }
        let (w, h) = (width as f64, height as f64);
        let min_crop = self.min_crop_size as f64;
        // Crops along the long side only; the count is the aspect ratio rounded half up, no more
        // than fit at the minimum crop size, then clamped to [2, max].
        let count = |long: f64, short: f64| -> u32 {
            let n = ((long / short + 0.5).floor() as u32).min((long / min_crop).floor() as u32);
            n.max(2).min(self.max_num_crops)
        };
        let (n_w, n_h) = if width >= height {
            if w / h < self.min_ratio_to_activate {
                return Vec::new();
            }
            (count(w, h), 1)
        } else {
            if h / w < self.min_ratio_to_activate {
                return Vec::new();
            }
            (1, count(h, w))
        };
        if n_w == 0 || n_h == 0 {
            // Only reachable with max_num_crops = 0; the reference would divide by zero.
            return Vec::new();
        }
        let crop_w = (w / n_w as f64).ceil() as u32;
        let crop_h = (h / n_h as f64).ceil() as u32;
        if crop_w.min(crop_h) < self.min_crop_size {
            return Vec::new();
        }
        let mut boxes = Vec::with_capacity((n_w * n_h) as usize);
        for iy in 0..n_h {
            for ix in 0..n_w {
                let (x, y) = (ix * crop_w, iy * crop_h);
                // Python slicing clips the last crop at the border (and would give an empty
                // crop past it, which only absurd settings such as a minimum of 0 can reach).
                let (cw, ch) = (
                    crop_w.min(width.saturating_sub(x)),
                    crop_h.min(height.saturating_sub(y)),
                );
                if cw > 0 && ch > 0 {
                    boxes.push((x, y, cw, ch));
                }
            }
        }
        boxes
    }
}

/// The pan-and-scan crops of `img` (not the original: the caller puts the whole image first, as
/// the reference's `pixel_values` does). Each crop is then preprocessed like a whole image.
pub fn pan_and_scan(img: &RgbImage, settings: &PanAndScan) -> Vec<RgbImage> {
    settings
        .crop_boxes(img.width(), img.height())
        .into_iter()
        .map(|(x, y, w, h)| image::imageops::crop_imm(img, x, y, w, h).to_image())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_counts_follow_the_reference_rules() {
        let p = PanAndScan::default();
        // Square and mildly elongated images are left alone.
        assert!(p.crop_boxes(1000, 1000).is_empty());
        assert!(p.crop_boxes(1199, 1000).is_empty());
        // 2:1 landscape -> 2 crops of 1000x1000.
        assert_eq!(
            p.crop_boxes(2000, 1000),
            vec![(0, 0, 1000, 1000), (1000, 0, 1000, 1000)]
        );
        // 1.2 exactly activates; floor(1.2 + 0.5) = 1 is raised to 2.
        assert_eq!(p.crop_boxes(1200, 1000).len(), 2);
        // Very wide: capped at 4 crops; ceil(5001/4) = 1251, last crop clipped to 1248.
        assert_eq!(
            p.crop_boxes(5001, 1000),
            vec![
                (0, 0, 1251, 1000),
                (1251, 0, 1251, 1000),
                (2502, 0, 1251, 1000),
                (3753, 0, 1248, 1000)
            ]
        );
        // Portrait is symmetric.
        assert_eq!(p.crop_boxes(1000, 3000).len(), 3);
        assert_eq!(p.crop_boxes(1000, 3000)[2], (0, 2000, 1000, 1000));
        // Crops would be lower than 256 (the image is 200 high) -> none.
        assert!(p.crop_boxes(1500, 200).is_empty());
        // Ratio 2.4 -> 2 crops of 300x250, but 250 < 256 -> none.
        assert!(p.crop_boxes(600, 250).is_empty());
        // floor(w / 256) limits the count: ratio 3.85 rounds to 4, but only 3 crops of 256 fit.
        assert_eq!(p.crop_boxes(1000, 260).len(), 3);
        assert_eq!(p.crop_boxes(1000, 260)[2], (668, 0, 332, 260));
        // 800x300: round(2.67) = 3, floor(800/256) = 3, crop 267x300.
        assert_eq!(
            p.crop_boxes(800, 300),
            vec![(0, 0, 267, 300), (267, 0, 267, 300), (534, 0, 266, 300)]
        );
    }

    #[test]
    fn pixel_values_layout_and_range() {
        let img = RgbImage::from_pixel(10, 6, image::Rgb([0, 255, 51]));
        let v = pixel_values(&img, &Preprocess::gemma3_with_size(4));
        assert_eq!(v.len(), 3 * 16);
        assert!(v[..16].iter().all(|&x| x == -1.0));
        assert!(v[16..32].iter().all(|&x| x == 1.0));
        assert!(v[32..]
            .iter()
            .all(|&x| (x - (51.0 / 127.5 - 1.0)).abs() < 1e-6));
        let v = pixel_values(&img, &Preprocess::gemma3n_with_size(2));
        assert_eq!(&v[..4], &[0.0; 4]);
        assert_eq!(&v[4..8], &[1.0; 4]);
        assert!((v[8] - 0.2).abs() < 1e-7);
    }
}
