/*
 * The one piece of C in gemma-media: decodes a whole JPEG held in memory with libjpeg (MozJPEG's
 * copy of the libjpeg-turbo decoder, built by the mozjpeg-sys crate) the way Pillow and
 * torchvision call libjpeg-turbo: JDCT_ISLOW integer IDCT, fancy upsampling, libjpeg's own colour
 * conversion. libjpeg reports fatal errors by calling error_exit, which must not return; here it
 * longjmps back to gm_jpeg_decode, whose frames are all C, so no Rust frame is ever jumped over.
 */
#include <limits.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "jpeglib.h"
#include "jerror.h"

/* Result codes, mirrored in src/jpeg.rs. */
#define GM_OK 0
#define GM_ERROR 1        /* libjpeg refused the data; message in `message` */
#define GM_TRUNCATED 2    /* the data ends before the image does */
#define GM_TOO_MANY_SCANS 3
#define GM_SIZE_MISMATCH 4 /* the output does not have the size the caller expected */

struct gm_error_mgr {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int truncated;
  int too_many_scans;
  char *message; /* JMSG_LENGTH_MAX bytes, owned by the caller */
};

struct gm_progress_mgr {
  struct jpeg_progress_mgr pub;
  int max_scans;
};

static void gm_error_exit(j_common_ptr cinfo) {
  struct gm_error_mgr *err = (struct gm_error_mgr *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* Warnings are not printed; the one that matters (the data ran out, and libjpeg padded the rest
 * of the image with grey) is remembered so that the caller can refuse the image. */
static void gm_emit_message(j_common_ptr cinfo, int msg_level) {
  struct gm_error_mgr *err = (struct gm_error_mgr *)cinfo->err;
  if (msg_level < 0) {
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) err->truncated = 1;
    cinfo->err->num_warnings++;
  }
}

static void gm_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* A progressive file may hold any number of scans, each a full pass over the coefficients. */
static void gm_progress(j_common_ptr cinfo) {
  struct gm_progress_mgr *progress = (struct gm_progress_mgr *)cinfo->progress;
  struct gm_error_mgr *err = (struct gm_error_mgr *)cinfo->err;
  if (cinfo->is_decompressor &&
      ((j_decompress_ptr)cinfo)->input_scan_number > progress->max_scans) {
    err->too_many_scans = 1;
    longjmp(err->jump, 1);
  }
}

/*
 * Decodes `data[0..len]` into `out`, row after row, `components` bytes a pixel: grey for 1
 * component, RGB for 3, CMYK (as stored, Adobe-inverted or not) for 4. `out_len` must be exactly
 * width * height * components. `message` receives libjpeg's text on GM_ERROR.
 */
int gm_jpeg_decode(const unsigned char *data, size_t len, unsigned char *out, size_t out_len,
                   unsigned int width, unsigned int height, int components, long max_memory,
                   int max_scans, char *message) {
  struct jpeg_decompress_struct cinfo;
  struct gm_error_mgr err;
  struct gm_progress_mgr progress;
  /* volatile: read after a longjmp. */
  volatile int status = GM_ERROR;

  if (len > ULONG_MAX) return GM_SIZE_MISMATCH; /* jpeg_mem_src takes an unsigned long */
  memset(&cinfo, 0, sizeof(cinfo));
  memset(&err, 0, sizeof(err));
  memset(&progress, 0, sizeof(progress));
  message[0] = '\0';
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = gm_error_exit;
  err.pub.emit_message = gm_emit_message;
  err.pub.output_message = gm_output_message;
  err.message = message;
  progress.pub.progress_monitor = gm_progress;
  progress.max_scans = max_scans;

  if (setjmp(err.jump)) {
    if (err.too_many_scans) status = GM_TOO_MANY_SCANS;
    else if (err.truncated) status = GM_TRUNCATED;
    else status = GM_ERROR;
    jpeg_destroy_decompress(&cinfo);
    return status;
  }

  jpeg_create_decompress(&cinfo);
  cinfo.mem->max_memory_to_use = max_memory;
  cinfo.progress = &progress.pub;
  jpeg_mem_src(&cinfo, data, (unsigned long)len);
  jpeg_read_header(&cinfo, TRUE);

  if (cinfo.image_width != width || cinfo.image_height != height ||
      cinfo.num_components != components) {
    jpeg_destroy_decompress(&cinfo);
    return GM_SIZE_MISMATCH;
  }
  switch (components) {
    case 1: cinfo.out_color_space = JCS_GRAYSCALE; break;
    case 3: cinfo.out_color_space = JCS_RGB; break;
    case 4: cinfo.out_color_space = JCS_CMYK; break;
    default:
      jpeg_destroy_decompress(&cinfo);
      return GM_SIZE_MISMATCH;
  }
  /* libjpeg's defaults, which the reference keeps; set anyway so that nothing depends on them. */
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  cinfo.scale_num = 1;
  cinfo.scale_denom = 1;
  cinfo.quantize_colors = FALSE;

  jpeg_start_decompress(&cinfo);
  if (cinfo.output_width != width || cinfo.output_height != height ||
      cinfo.output_components != components ||
      out_len != (size_t)width * (size_t)height * (size_t)components) {
    jpeg_destroy_decompress(&cinfo);
    return GM_SIZE_MISMATCH;
  }
  {
    size_t stride = (size_t)width * (size_t)components;
    while (cinfo.output_scanline < cinfo.output_height) {
      JSAMPROW row = out + (size_t)cinfo.output_scanline * stride;
      jpeg_read_scanlines(&cinfo, &row, 1);
      /* A truncated file is padded with grey: stop as soon as that is known. */
      if (err.truncated) {
        jpeg_destroy_decompress(&cinfo);
        return GM_TRUNCATED;
      }
    }
  }
  /* Every row is in (libjpeg reads ahead, so data cut off anywhere before the EOI marker has
   * already set `truncated`); jpeg_finish_decompress would only skip to EOI. */
  jpeg_destroy_decompress(&cinfo);
  return GM_OK;
}
