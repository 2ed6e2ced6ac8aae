/*
 * seesr.h: the C ABI of the native SeeSR runtime (C99-compatible, no C++ types).
 *
 * Every function returns a seesr_status; on failure, seesr_last_error() gives a message naming the value
 * at fault and what was expected (kept per thread, valid until that thread's next seesr_* call).
 * Nothing in the library aborts or exits the host process.
 *
 * Handles are opaque. Structs passed in carry their own size (struct_size, set by the *_init function), so
 * later versions can add fields without breaking callers built against this one. The ABI version is
 * SEESR_ABI_VERSION; seesr_abi_version() reports the library's, which a caller should compare with it.
 *
 * Typical use:
 *   seesr_engine_options engine; seesr_engine_options_init(&engine);
 *   seesr_pipeline *pipeline; seesr_pipeline_open("bundle", &engine, &pipeline);
 *   seesr_options *options; seesr_options_create(pipeline, &options);
 *   seesr_options_set_int(options, "steps", 20);
 *   seesr_image *out; seesr_upscale(pipeline, rgb, width, height, stride, options, &out);
 *   const uint8_t *pixels = seesr_image_pixels(out);  // RGB8, seesr_image_stride(out) bytes a row
 *   seesr_image_free(out); seesr_options_free(options); seesr_pipeline_close(pipeline);
 */
#ifndef SEESR_H
#define SEESR_H

#include <stddef.h>
#include <stdint.h>

/* Built and tested on Linux only: the library uses POSIX calls (mkdtemp, mmap, open/read/write) and Linux's
   struct stat fields, so other systems need porting first. */
#if defined(__GNUC__)
#  define SEESR_API __attribute__((visibility("default")))
#else
#  define SEESR_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Incremented on any incompatible change of this header. */
#define SEESR_ABI_VERSION 1

typedef enum seesr_status {
    SEESR_OK = 0,
    SEESR_ERROR_INVALID_ARGUMENT = 1, /* a NULL handle or pointer, a size that cannot be, a struct_size too small */
    SEESR_ERROR_BUNDLE = 2,           /* the bundle is missing, malformed, of another schema, or reaches outside itself */
    SEESR_ERROR_OPTION = 3,           /* an unknown option, or a value of the wrong type or outside its range */
    SEESR_ERROR_IMAGE = 4,            /* an input image that cannot be used (too small, too large, bad stride) */
    SEESR_ERROR_ENGINE = 5,           /* the inference engine is missing, cannot run here, or failed */
    SEESR_ERROR_CANCELLED = 6,        /* a callback asked to stop */
    SEESR_ERROR_OUT_OF_MEMORY = 7,
    SEESR_ERROR_NOT_IMPLEMENTED = 8,  /* declared in this ABI, not yet provided by this build */
    SEESR_ERROR_INTERNAL = 9          /* a bug in the library; the message says where */
} seesr_status;

/* ------------------------------------------------------------------ versions and errors */

SEESR_API int32_t seesr_abi_version(void);
/* The library's version ("0.1.0"), the same as the Python packages'. Static storage. */
SEESR_API const char *seesr_version(void);
/* A fixed name for a status ("SEESR_ERROR_BUNDLE"); "unknown status" for a value outside the enum. */
SEESR_API const char *seesr_status_name(seesr_status status);
/* The message of the last failure on this thread ("" when the last call succeeded). */
SEESR_API const char *seesr_last_error(void);

/* ------------------------------------------------------------------ engines */

/* What the inference engine `engine` ("openvino"; NULL: "openvino") finds on this machine, as a JSON object, so
   that an application can choose its device and precision before opening a pipeline:
     {"engine": "openvino", "version": "2026.4.1-...",
      "devices": [{"name": "CPU", "full_name": "...", "capabilities": ["BF16", "FP32", "INT8", ...],
                   "bf16": true, "precisions": ["fp32", "bf16", "int8", "int8-bf16"]}, ...]}
   `capabilities` are the device's OPTIMIZATION_CAPABILITIES (sorted); `bf16` says whether it computes in bf16
   natively (on a CPU: AVX512_BF16 or AMX units); `precisions` are the seesr_engine_options precisions it runs
   (seesr_pipeline_open refuses the others on that device). The same facts as `seesr doctor --json` reports
   under engines.openvino. The engine is asked on the first call; the string belongs to the library and stays
   valid until the process ends. SEESR_ERROR_ENGINE for an engine this build lacks or one that cannot start. */
SEESR_API seesr_status seesr_engine_info_json(const char *engine, const char **out);

/* ------------------------------------------------------------------ pipeline */

typedef struct seesr_pipeline seesr_pipeline;

/* sha256 of the bundle's files on open, by the Python runtime's rule: a mismatch or a missing file is
   SEESR_ERROR_BUNDLE naming the bundle and every such file. AUTO (the default) keeps the verification stamp
   .seesr-verified.json in the bundle (else in $XDG_CACHE_HOME/seesr/verified/), shared with the Python runtime:
   a file whose size, mtime, ctime and inode are those stamped with the manifest's sha256 is not hashed again. */
typedef enum seesr_verify {
    SEESR_VERIFY_AUTO = 0,   /* hash files new or changed since their last verification */
    SEESR_VERIFY_ALWAYS = 1, /* hash every file the manifest pins */
    SEESR_VERIFY_NEVER = 2   /* trust the files (the caller verified them otherwise) */
} seesr_verify;

typedef struct seesr_engine_options {
    uint32_t struct_size;  /* sizeof(seesr_engine_options), set by seesr_engine_options_init */
    const char *engine;    /* inference engine: "openvino" (NULL: "openvino") */
    const char *device;    /* engine device: "CPU", "GPU", "AUTO", ... (NULL: "CPU") */
    const char *precision; /* as the Python runtime's OpenVINO backend: "fp32", "bf16", "fp16", "int8" or
                              "int8-bf16" (the int8 ones need a bundle built with int8 graphs); NULL: "fp32" */
    int32_t threads;       /* inference threads; 0: the engine's choice */
    const char *cache_dir; /* compiled-model cache folder; NULL: no cache */
    seesr_verify verify;   /* sha256 check of the bundle's files */
    /* Added after the first release (a caller built before it passes the shorter struct_size, which is read as
       NULL): a folder (UTF-8) where the tiled VAE keeps the tile states waiting at each GroupNorm, in files of a
       private temporary folder made there for each tiled-VAE run (encoder, decoder) and removed when that ends
       (failed or cancelled too), instead of in memory. Resident memory then follows one tile rather than the image, at the cost of disk traffic,
       with the same result. It must exist and be writable (SEESR_ERROR_INVALID_ARGUMENT on open otherwise, and
       from an upscale that finds it gone); a full disk (or file-size limit) during an upscale is
       SEESR_ERROR_OUT_OF_MEMORY, naming the file. NULL: in memory. */
    const char *tiled_vae_spill_dir;
    /* Added after tiled_vae_spill_dir (a shorter struct_size reads as 0): the most memory, in bytes, an upscale may
       use as a memory-limited container counts it; 0: no budget (every network stays loaded once used, the
       fastest). Under a budget each upscale is planned as the Python runtime plans it (the same calibration and
       arithmetic; seesr_pipeline_memory_plan_json shows the plan): each network is loaded when its stage starts
       and freed when it ends (ControlNet and UNet only in the denoising loop), the engine maps its weights from
       prepared IR files (in cache_dir/ir, else a private temporary folder), and where a stage still does not fit,
       the tiled VAE's waiting tiles go to files, then (the image then differs slightly) the denoisers' linear layers
       take int8 weights and tiles shrink. An upscale no plan fits fails with SEESR_ERROR_OPTION before any network
       runs, naming the smallest budget that would do. CPU devices only (SEESR_ERROR_OPTION on open otherwise). */
    uint64_t memory_budget;
} seesr_engine_options;

SEESR_API seesr_status seesr_engine_options_init(seesr_engine_options *options);

/* Open the bundle folder `bundle_path` (UTF-8). `options` NULL: the defaults of seesr_engine_options_init. */
SEESR_API seesr_status seesr_pipeline_open(const char *bundle_path, const seesr_engine_options *options,
                                           seesr_pipeline **out);
/* NULL is accepted and ignored. */
SEESR_API void seesr_pipeline_close(seesr_pipeline *pipeline);

/* The bundle's name and schema version, and the version of the exporter that built it ("" if unrecorded).
   The strings live as long as the pipeline. */
SEESR_API seesr_status seesr_pipeline_bundle_name(const seesr_pipeline *pipeline, const char **out);
SEESR_API seesr_status seesr_pipeline_bundle_schema_version(const seesr_pipeline *pipeline, int32_t *out);
SEESR_API seesr_status seesr_pipeline_bundle_exporter_version(const seesr_pipeline *pipeline, const char **out);
/* The bundle's upscale options table (its manifest's pipeline.options, as JSON: name, type, default,
   minimum/maximum or choices, help). Lives as long as the pipeline. */
SEESR_API seesr_status seesr_pipeline_options_json(const seesr_pipeline *pipeline, const char **out);

/* Compiled models alive now in the pipeline's engine, per network or tiled-VAE segment ("vae_decoder#3"), as a JSON
   object ({"controlnet": 1, "unet": 1}; {} when none): how a caller (or a test) sees a memory budget's stages free
   their networks. Safe to call from a progress callback. Free the string with seesr_string_free. */
SEESR_API seesr_status seesr_pipeline_resident_json(const seesr_pipeline *pipeline, char **out);

/* A string the library allocated for the caller (NULL is accepted and ignored). */
SEESR_API void seesr_string_free(char *text);

/* A size in bytes from text as the Python runtime's memory_budget option reads it: a whole number of bytes, or a
   number with a unit ("4GB", "2500MB", "4GiB", "3.5 GB"; B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB:
   powers of 1024). SEESR_ERROR_OPTION naming `name`, the text and these forms for anything else. */
SEESR_API seesr_status seesr_parse_byte_size(const char *name, const char *text, uint64_t *out);

/* ------------------------------------------------------------------ per-call options */

typedef struct seesr_options seesr_options;

/* Return non-zero to cancel the upscale (it then fails with SEESR_ERROR_CANCELLED). `step` counts from 1. */
typedef int (*seesr_progress_fn)(void *user_data, int32_t step, int32_t total);

/* Fill `out` (count = the product of `shape`) with standard-normal draws for `kind` ("initial",
   "posterior" or "step", in the order the pipeline draws them). Replaces the seeded source, for parity
   with another implementation's random stream. Return non-zero to cancel. */
typedef int (*seesr_noise_fn)(void *user_data, const char *kind, const int64_t *shape, int32_t rank, float *out,
                              size_t count);

/* The latents [1, 4, h, w] after step `step` (counting from 1) of an upscale: `count` float32 values of
   `shape`, readable during the call only. For checking the sampling loop against another implementation of
   it (the Python runtime's UpscaleResult.latents), not needed to upscale. */
typedef void (*seesr_latents_fn)(void *user_data, int32_t step, const int64_t *shape, int32_t rank,
                                 const float *values, size_t count);

/* Options of one upscale, checked against the pipeline's bundle (names, types and ranges of its options
   table). Every option left unset takes the bundle's default. */
SEESR_API seesr_status seesr_options_create(const seesr_pipeline *pipeline, seesr_options **out);
SEESR_API void seesr_options_free(seesr_options *options);
SEESR_API seesr_status seesr_options_set_int(seesr_options *options, const char *name, int64_t value);
SEESR_API seesr_status seesr_options_set_float(seesr_options *options, const char *name, double value);
SEESR_API seesr_status seesr_options_set_bool(seesr_options *options, const char *name, int value);
SEESR_API seesr_status seesr_options_set_string(seesr_options *options, const char *name, const char *value);
/* Back to the bundle's default. */
SEESR_API seesr_status seesr_options_unset(seesr_options *options, const char *name);
/* NULL callback: none (progress) or the seeded source (noise). */
SEESR_API seesr_status seesr_options_set_progress(seesr_options *options, seesr_progress_fn callback,
                                                  void *user_data);
SEESR_API seesr_status seesr_options_set_noise(seesr_options *options, seesr_noise_fn callback, void *user_data);
/* NULL callback: none. */
SEESR_API seesr_status seesr_options_set_step_latents(seesr_options *options, seesr_latents_fn callback,
                                                      void *user_data);

/* ------------------------------------------------------------------ upscaling */

typedef struct seesr_image seesr_image;

/* Upscale an RGB8 image: `height` rows of `width` pixels, 3 bytes each, rows `stride` bytes apart
   (stride >= 3 * width), to (upscale * width) x (upscale * height). `options` NULL: the bundle's defaults.
   The result belongs to the caller, who frees it with seesr_image_free. The progress callback runs after
   every step; when it (or the noise callback) cancels, the call returns SEESR_ERROR_CANCELLED and *out stays
   NULL. A pipeline may be used by several threads at once (each call with its own or a shared options). */
SEESR_API seesr_status seesr_upscale(seesr_pipeline *pipeline, const uint8_t *rgb, int32_t width, int32_t height,
                                     int32_t stride, const seesr_options *options, seesr_image **out);
/* Only the tags and prompt of an image (runs the tagger, not the diffusion); read them from the result. */
SEESR_API seesr_status seesr_describe(seesr_pipeline *pipeline, const uint8_t *rgb, int32_t width, int32_t height,
                                      int32_t stride, const seesr_options *options, seesr_image **out);

/* The memory plan of an upscale of a `width` x `height` image with `options` (NULL: the bundle's defaults) under the
   pipeline's memory_budget, as a JSON object with the keys and values of the Python runtime's MemoryPlan.to_json
   (budget, engine, staged, tile sizes, spill, int8_linear, stages with their networks, weights, working memory,
   loading, kept and peak bytes, changed, peak); computed without running anything. Without a budget: the plan that
   keeps every network resident (budget null). A budget no plan fits: SEESR_ERROR_OPTION naming the smallest budget
   that would do, as seesr_upscale would fail. Free the string with seesr_string_free. */
SEESR_API seesr_status seesr_pipeline_memory_plan_json(const seesr_pipeline *pipeline, int32_t width, int32_t height,
                                                       const seesr_options *options, char **out);

SEESR_API void seesr_image_free(seesr_image *image);
/* The result's pixels: RGB8, rows tightly packed (stride = 3 * width); NULL from seesr_describe. */
SEESR_API const uint8_t *seesr_image_pixels(const seesr_image *image);
SEESR_API int32_t seesr_image_width(const seesr_image *image);
SEESR_API int32_t seesr_image_height(const seesr_image *image);
SEESR_API int32_t seesr_image_stride(const seesr_image *image);
/* The tags DAPE found and the prompt the image was generated with (UTF-8, as long as the image). */
SEESR_API const char *seesr_image_tags(const seesr_image *image);
SEESR_API const char *seesr_image_prompt(const seesr_image *image);

#ifdef __cplusplus
}
#endif

#endif /* SEESR_H */
