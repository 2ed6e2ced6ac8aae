/* A C99 user of the native runtime: open a bundle, set options, upscale a generated image, write it as PPM.
 *
 *   seesr_example_c BUNDLE [OUT.ppm] [STEPS]
 *
 * Exit status: 0 on success, otherwise the seesr_status of the failing call (its message on stderr). */
#include "seesr.h"

#include <stdio.h>
#include <stdlib.h>

static int report(seesr_status status, const char *call) {
    fprintf(stderr, "%s failed: %s: %s\n", call, seesr_status_name(status), seesr_last_error());
    return (int)status;
}

static int write_ppm(const char *path, const seesr_image *image) {
    FILE *file = fopen(path, "wb");
    int32_t row;
    if (file == NULL) return 0;
    fprintf(file, "P6\n%d %d\n255\n", (int)seesr_image_width(image), (int)seesr_image_height(image));
    for (row = 0; row < seesr_image_height(image); ++row) {
        const uint8_t *pixels = seesr_image_pixels(image) + (size_t)row * (size_t)seesr_image_stride(image);
        fwrite(pixels, 3, (size_t)seesr_image_width(image), file);
    }
    return fclose(file) == 0;
}

static int print_progress(void *user_data, int32_t step, int32_t total) {
    (void)user_data;
    fprintf(stderr, "step %d/%d\n", (int)step, (int)total);
    return 0;
}

int main(int argc, char **argv) {
    enum { WIDTH = 40, HEIGHT = 32 };
    static uint8_t rgb[HEIGHT][WIDTH][3];
    seesr_engine_options engine;
    seesr_pipeline *pipeline = NULL;
    seesr_options *options = NULL;
    seesr_image *image = NULL;
    const char *name = NULL;
    seesr_status status;
    int x, y, result = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s BUNDLE [OUT.ppm] [STEPS]\n", argv[0]);
        return 64;
    }
    printf("seesr %s (ABI %d, header ABI %d)\n", seesr_version(), (int)seesr_abi_version(), SEESR_ABI_VERSION);
    seesr_engine_options_init(&engine);
    engine.verify = SEESR_VERIFY_NEVER;
    if ((status = seesr_pipeline_open(argv[1], &engine, &pipeline)) != SEESR_OK) return report(status, "open");
    seesr_pipeline_bundle_name(pipeline, &name);
    printf("bundle %s\n", name);

    for (y = 0; y < HEIGHT; ++y) {
        for (x = 0; x < WIDTH; ++x) {
            rgb[y][x][0] = (uint8_t)(6 * x);
            rgb[y][x][1] = (uint8_t)(7 * y);
            rgb[y][x][2] = (uint8_t)(128 + x - y);
        }
    }
    if ((status = seesr_options_create(pipeline, &options)) != SEESR_OK) {
        result = report(status, "options");
    } else if (argc > 3 && (status = seesr_options_set_int(options, "steps", atoi(argv[3]))) != SEESR_OK) {
        result = report(status, "steps");
    } else if ((status = seesr_options_set_progress(options, print_progress, NULL)) != SEESR_OK) {
        result = report(status, "progress");
    } else if ((status = seesr_upscale(pipeline, &rgb[0][0][0], WIDTH, HEIGHT, 3 * WIDTH, options, &image)) !=
               SEESR_OK) {
        result = report(status, "upscale");
    } else {
        printf("%dx%d, tags: %s\nprompt: %s\n", (int)seesr_image_width(image), (int)seesr_image_height(image),
               seesr_image_tags(image), seesr_image_prompt(image));
        if (argc > 2 && !write_ppm(argv[2], image)) {
            fprintf(stderr, "cannot write %s\n", argv[2]);
            result = 73;
        }
    }
    seesr_image_free(image);
    seesr_options_free(options);
    seesr_pipeline_close(pipeline);
    return result;
}
