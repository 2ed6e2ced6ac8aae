/* Repeated upscales through the C ABI, for the memory tests (tests/test_cpp_runtime.py): run natively it
 * reports the heap in use after the first calls and after the last, so growth per call shows; run under
 * valgrind it gives memcheck every path of an upscale, freed as a user frees it.
 *
 *   seesr_memory_test BUNDLE CALLS
 *
 * Prints "heap after N calls: BYTES" after call 2 (or 1) and after call CALLS (glibc's mallinfo2: bytes in use
 * in the arena plus those in mmap'd blocks). Exit status: 0, or the seesr_status of the failing call. */
#define _GNU_SOURCE
#include "seesr.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>

enum { WIDTH = 16, HEIGHT = 16, FIRST_REPORT = 2 };

static int report(seesr_status status, const char *call) {
    fprintf(stderr, "%s failed: %s: %s\n", call, seesr_status_name(status), seesr_last_error());
    return (int)status;
}

static size_t heap_in_use(void) {
    struct mallinfo2 info = mallinfo2();
    return info.uordblks + info.hblkhd;
}

/* One upscale of `rgb` at 1 step to 64x64, its image freed. */
static seesr_status upscale_once(seesr_pipeline *pipeline, const seesr_options *options, const uint8_t *rgb) {
    seesr_image *image = NULL;
    seesr_status status = seesr_upscale(pipeline, rgb, WIDTH, HEIGHT, 3 * WIDTH, options, &image);
    seesr_image_free(image);
    return status;
}

int main(int argc, char **argv) {
    static uint8_t rgb[HEIGHT][WIDTH][3];
    seesr_engine_options engine;
    seesr_pipeline *pipeline = NULL;
    seesr_options *options = NULL;
    seesr_status status;
    int calls, call, x, y, result = 0;

    if (argc != 3 || (calls = atoi(argv[2])) < 1) {
        fprintf(stderr, "usage: %s BUNDLE CALLS (CALLS >= 1)\n", argv[0]);
        return 64;
    }
    for (y = 0; y < HEIGHT; ++y) {
        for (x = 0; x < WIDTH; ++x) {
            rgb[y][x][0] = (uint8_t)(13 * x);
            rgb[y][x][1] = (uint8_t)(11 * y);
            rgb[y][x][2] = (uint8_t)(7 * (x + y));
        }
    }
    seesr_engine_options_init(&engine);
    engine.verify = SEESR_VERIFY_NEVER;
    engine.threads = 1; /* one worker thread: memcheck serialises threads anyway */
    if ((status = seesr_pipeline_open(argv[1], &engine, &pipeline)) != SEESR_OK) return report(status, "open");
    if ((status = seesr_options_create(pipeline, &options)) != SEESR_OK ||
        (status = seesr_options_set_int(options, "steps", 1)) != SEESR_OK ||
        (status = seesr_options_set_int(options, "process_size", 64)) != SEESR_OK ||
        (status = seesr_options_set_int(options, "seed", 3)) != SEESR_OK) {
        result = report(status, "options");
    }
    for (call = 1; result == 0 && call <= calls; ++call) {
        if ((status = upscale_once(pipeline, options, &rgb[0][0][0])) != SEESR_OK) {
            result = report(status, "upscale");
        } else if (call == (calls < FIRST_REPORT ? calls : FIRST_REPORT) || call == calls) {
            printf("heap after %d calls: %zu\n", call, heap_in_use());
            fflush(stdout);
        }
    }
    seesr_options_free(options);
    seesr_pipeline_close(pipeline);
    return result;
}
