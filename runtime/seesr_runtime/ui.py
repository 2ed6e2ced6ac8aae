"""``seesr ui``: a web page for trying SeeSR on one's own photos, on the torch-free runtime (the ``ui`` extra).

What the official ``gradio_seesr.py`` demo offers (upload; user, positive and negative prompts; guidance, steps
and seed; several samples; latent tile size and overlap; scale factor; a gallery), plus what it lacks: a
before/after comparison with the input enlarged by the same factor, the tags DAPE found and the full prompt,
per-step progress, the time taken, a PNG download with the bytes ``seesr upscale`` writes, cancel at the next
step, and the library's one-line message for bad input.

- **Controls** come from the options table (``options.py``): name, range, choices, help; defaults are the
  bundle's (a turbo bundle's 2 steps and guidance 1.0). ``max_pixels`` is the server's (``--max-pixels``), not
  a browser's. The run event takes the widgets' raw values (``preprocess=False``), so the options table is the
  only check of a value, a hand-made request's included, and its ``OptionError`` text is what the page shows.
- **Jobs**: one pipeline, loaded before the server starts, shared by every session; Gradio's queue runs
  ``concurrency`` jobs at once (1 by default) and shows each browser its place. Cancel marks the session's
  jobs; the pipeline's progress callback raises ``UpscaleCancelled`` at the next step.
- **Safety**: 127.0.0.1 unless ``--host`` says otherwise; no share link; uploads limited in size; Gradio's
  analytics and version check and Hugging Face's and onnxruntime's telemetry off, and files named by URL
  refused (``RefuseRemoteFiles``): no outbound request; every
  file (Gradio's upload cache and our results) lives in one temporary folder, removed when the server stops
  (Ctrl-C or SIGTERM) and swept of jobs older than an hour while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from PIL import Image

from . import options as option_table
from .errors import ImageRejected, OptionError, SeeSRError, UpscaleCancelled
from .filemodes import save_png
from .inputs import load_lr_image
from .lazy import lazy_import
from .pipeline import SeeSRPipeline

gr = lazy_import("gradio", extra="ui")
starlette_middleware = lazy_import("starlette.middleware", extra="ui")  # Gradio's web framework

log = logging.getLogger(__name__)

# Set before Gradio is imported: no analytics or version check (Gradio), no telemetry (huggingface_hub), no
# Node server for server-side rendering. With onnxruntime's telemetry off (the package's __init__), no request
# leaves the machine.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SSR_MODE": "False",
    "GRADIO_MCP_SERVER": "False",
}

# Where each option's widget goes (names only: everything else about an option is in the options table).
PROMPT_OPTIONS = ("prompt", "added_prompt", "negative_prompt")
MAIN_OPTIONS = ("steps", "guidance", "seed", "upscale")
SERVER_OPTIONS = ("max_pixels",)  # the server's --max-pixels: a browser must not raise the decompression guard
ADVANCED_OPTIONS = tuple(
    name for name in option_table.NAMES if name not in (*PROMPT_OPTIONS, *MAIN_OPTIONS, *SERVER_OPTIONS)
)
WIDGET_OPTIONS = (*PROMPT_OPTIONS, *MAIN_OPTIONS, *ADVANCED_OPTIONS)  # the run event's inputs, in this order
MAX_SAMPLES = 10  # the official demo's "sample times" slider goes to 10
CANCEL_WAIT_S = 60.0  # how long the cancel button waits for the running job to reach its next step
JOB_LIFETIME_S = 3600  # results (and Gradio's copies and uploads) older than this are removed
ELEMENT_IDS = {  # for the page's readers: the tests, and anyone styling it
    "input": "seesr-input",
    "run": "seesr-run",
    "cancel": "seesr-cancel",
    "status": "seesr-status",
    "comparison": "seesr-comparison",
    "gallery": "seesr-gallery",
    "files": "seesr-files",
    "tags": "seesr-tags",
    "prompt": "seesr-prompt",
    "samples": "seesr-samples",
}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 1  # jobs run at once; the others wait in the queue
    max_file_size: int = 50 * 10**6  # bytes per upload
    max_pixels: int = option_table.default("max_pixels")


URL_PATH = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*:")  # "http://...", "https:...", "file:..." (not "/tmp/x")


class RefuseRemoteFiles:
    """ASGI middleware: a JSON request naming a file by URL (``{"path": "http://..."}``) gets 400 and one line.
    Gradio would fetch such a URL from the server before any of our code runs (and look its host up over DNS
    over HTTPS first): an outbound request a hand-made request could cause. The page itself sends local paths."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or ())
        if scope["type"] != "http" or b"json" not in headers.get(b"content-type", b""):
            await self.app(scope, receive, send)
            return
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message.get("type") == "http.request" and message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in messages)
        named = _url_path(body)
        if named is not None:
            text = f"error: a file must be uploaded, not named by URL ({named[:80]!r})".encode()
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": text})
            return
        pending = iter(messages)

        async def replay() -> Any:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def _url_path(body: bytes) -> str | None:
    """The first ``path`` of a JSON body's objects that is a URL, if any (an unreadable body: None, Gradio's to
    refuse)."""
    try:
        stack = [json.loads(body or b"null")]
    except ValueError:
        return None
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and URL_PATH.match(path):
                return path
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def widget_id(name: str) -> str:
    return f"seesr-option-{name.replace('_', '-')}"


def option_widget(option: option_table.Option, default: Any) -> Any:
    """The Gradio input for one option of the table: its label, help, range or choices, and ``default``."""
    common: dict[str, Any] = {"label": option.name.replace("_", " "), "info": option.help}
    common.update(elem_id=widget_id(option.name), value=default)
    if option.kind is bool:
        return gr.Checkbox(**common)
    if option.choices is not None:
        return gr.Radio(choices=list(option.choices), **common)
    if option.kind is str:
        return gr.Textbox(lines=1, **common)
    step = 1 if option.kind is int else 0.1
    if option.minimum is not None and option.maximum is not None:
        return gr.Slider(minimum=option.minimum, maximum=option.maximum, step=step, **common)
    return gr.Number(minimum=option.minimum, precision=0 if option.kind is int else None, step=step, **common)


def raw_options(values: tuple[Any, ...]) -> dict[str, Any]:
    """The widgets' raw values by option name. A browser sends whole numbers of an int option as JSON
    numbers, which may arrive as floats (3.0): those become ints; everything else is left to the table."""
    given = dict(zip(WIDGET_OPTIONS, values, strict=True))
    for name, value in given.items():
        if option_table.OPTION[name].kind is int and isinstance(value, float) and value.is_integer():
            given[name] = int(value)
    return given


def check_samples(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SAMPLES:
        raise OptionError(f"samples must be an integer in [1, {MAX_SAMPLES}], got {value!r}", "samples")
    return value


def safe_stem(name: object) -> str:
    """A file name's stem reduced to letters, digits, '.', '_' and '-' (it names the downloads)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name or "image")).stem).strip("._")
    return stem[:80] or "image"


class Cancels:
    """Which jobs were cancelled: a cancel in a session stops that session's jobs armed before it, the running
    one at its next step and the queued ones when they start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_cancel: dict[str, float] = {}  # session -> time of its last cancel
        self._running: dict[str, tuple[threading.Event, list[str]]] = {}  # session -> (ended, [final status])

    def cancel(self, session: str) -> None:
        with self._lock:
            self._last_cancel[session] = time.monotonic()

    def cancelled(self, session: str, armed_at: float) -> bool:
        with self._lock:
            return self._last_cancel.get(session, -1.0) >= armed_at

    @contextmanager
    def running(self, session: str) -> Iterator[list[str]]:
        """A session's job while it runs; the caller appends its final status to the list it gets."""
        entry: tuple[threading.Event, list[str]] = (threading.Event(), [])
        with self._lock:
            self._running[session] = entry
        try:
            yield entry[1]
        finally:
            entry[0].set()
            with self._lock:
                if self._running.get(session) is entry:
                    del self._running[session]

    def final_status(self, session: str, timeout: float) -> str | None:
        """The final status of the session's running job once it has ended (None: no job running, or still
        running after ``timeout`` s). The cancel button shows it, so that its answer and the job's own, which
        reach the page in either order, are the same text."""
        with self._lock:
            entry = self._running.get(session)
        if entry is None or not entry[0].wait(timeout):
            return None
        return entry[1][-1] if entry[1] else None


@dataclass
class JobResult:
    comparison: tuple[str, str] | None
    gallery: list[tuple[str, str]]
    files: list[str]
    tags: str
    prompt: str
    status: str
    pairs: list[tuple[str, str]]  # (before, after) per sample, for the gallery's selection

    def outputs(self) -> tuple[Any, ...]:
        return self.comparison, self.gallery, self.files or None, self.tags, self.prompt, self.status, self.pairs

    @classmethod
    def failed(cls, message: str) -> JobResult:
        return cls(None, [], [], "", "", message, [])


class Upscaler:
    """The jobs of one server: one pipeline shared by every session, results under ``work``."""

    def __init__(self, pipe: SeeSRPipeline, settings: ServerSettings, work: Path):
        self.pipe, self.settings, self.work = pipe, settings, work
        self.cancels = Cancels()

    def run(
        self,
        image: Any,
        values: tuple[Any, ...],
        samples: Any,
        session: str,
        armed_at: float,
        progress: Callable[..., object],
    ) -> JobResult:
        """One job: ``samples`` upscales with consecutive seeds. Every error a user can cause comes back as
        ``error: <the library's message>``; the server goes on."""
        start = time.perf_counter()
        with self.cancels.running(session) as final:
            try:
                if self.cancels.cancelled(session, armed_at):
                    raise UpscaleCancelled("cancelled before it started")
                result = self._upscale(image, raw_options(values), check_samples(samples), session, armed_at, progress)
            except UpscaleCancelled as exc:
                log.info(f"ui: job of session {session[:8]} {exc}")
                result = JobResult.failed(f"cancelled: {exc} ({time.perf_counter() - start:.1f} s)")
            except (SeeSRError, OSError) as exc:
                log.info(f"ui: refused: {exc}")
                result = JobResult.failed(f"error: {exc}")
            final.append(result.status)
        return result

    def _upscale(
        self,
        image: Any,
        given: dict[str, Any],
        samples: int,
        session: str,
        armed_at: float,
        progress: Callable[..., object],
    ) -> JobResult:
        options = self.pipe.resolve_options({**given, "max_pixels": self.settings.max_pixels})
        path = image.get("path") if isinstance(image, dict) else None
        if not path:
            raise ImageRejected("no image: upload one first")
        lr, note = load_lr_image(Path(path), options["max_pixels"])
        job = self._job_folder()
        stem = safe_stem(image.get("orig_name") or path)
        before = job / f"{stem}_input_x{options['upscale']}.png"
        size = (lr.size[0] * options["upscale"], lr.size[1] * options["upscale"])
        save_png(before, lr.resize(size, Image.Resampling.BICUBIC))
        start, total = time.perf_counter(), samples * options["steps"]
        pairs, gallery, files, result = [], [], [], None
        for k in range(samples):
            seed = options["seed"] + k
            progress((k * options["steps"], total), desc=f"sample {k + 1}/{samples}: tags, prompt, encoding")

            def after_step(i: int, _t: int, k: int = k) -> None:
                if self.cancels.cancelled(session, armed_at):
                    raise UpscaleCancelled(f"cancelled after step {i + 1} of sample {k + 1}")
                progress((k * options["steps"] + i + 1, total), desc=f"sample {k + 1}/{samples}: denoising")

            result = self.pipe(lr, callback=after_step, **{**options, "seed": seed})
            target = job / f"{stem}_seed{seed}.png"
            save_png(target, result.image)
            pairs.append((str(before), str(target)))
            gallery.append((str(target), f"seed {seed}"))
            files.append(str(target))
        assert result is not None  # samples >= 1
        took = time.perf_counter() - start
        each = f", {took / samples:.1f} s each" if samples > 1 else ""
        seeds = f"{options['seed']}" + (f"..{options['seed'] + samples - 1}" if samples > 1 else "")
        status = (
            f"done: {samples} sample{'s' if samples > 1 else ''} of {lr.size[0]}x{lr.size[1]} -> "
            f"{result.image.size[0]}x{result.image.size[1]}, {options['steps']} steps, seed {seeds}, "
            f"in {took:.1f} s{each}" + (f" (note: {note})" if note else "")
        )
        log.info(f"ui: {status}")
        return JobResult(pairs[0], gallery, files, result.tags, result.prompt, status, pairs)

    def _job_folder(self) -> Path:
        """A new folder for one job's files; those of jobs older than ``JOB_LIFETIME_S`` are removed."""
        jobs = self.work / "jobs"
        jobs.mkdir(exist_ok=True)
        now = time.time()
        for old in jobs.iterdir():
            if now - old.stat().st_mtime > JOB_LIFETIME_S:
                shutil.rmtree(old, ignore_errors=True)
        folder = jobs / uuid.uuid4().hex
        folder.mkdir()
        return folder


def build_page(upscaler: Upscaler) -> Any:
    """The Gradio page (a ``gr.Blocks``), its controls generated from the options table."""
    defaults = upscaler.pipe.defaults
    variant = upscaler.pipe.manifest.data["pipeline"].get("variant", "standard")
    turbo = " (turbo bundle: its defaults)" if variant == "turbo" else ""
    widgets: dict[str, Any] = {}

    def add(names: tuple[str, ...]) -> None:
        for name in names:
            widgets[name] = option_widget(option_table.OPTION[name], defaults[name])

    with gr.Blocks(
        title="SeeSR x4 super-resolution",
        analytics_enabled=False,
        delete_cache=(JOB_LIFETIME_S // 4, JOB_LIFETIME_S),
    ) as page:
        gr.Markdown(
            "## SeeSR: semantics-aware real-world super-resolution\n"
            f"Torch-free runtime, bundle `{upscaler.pipe.manifest.root.name}`{turbo}; "
            f"images up to {upscaler.settings.max_pixels} pixels. "
            "[Paper](https://arxiv.org/abs/2311.16518), [official code](https://github.com/cswry/SeeSR)."
        )
        armed_at = gr.State(0.0)
        pairs = gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input", type="filepath", sources=["upload"], elem_id=ELEMENT_IDS["input"])
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id=ELEMENT_IDS["run"])
                    cancel = gr.Button("Cancel", variant="stop", elem_id=ELEMENT_IDS["cancel"])
                add(MAIN_OPTIONS)
                samples = gr.Slider(
                    minimum=1,
                    maximum=MAX_SAMPLES,
                    step=1,
                    value=1,
                    label="samples",
                    info="images made, with consecutive seeds from the seed",
                    elem_id=ELEMENT_IDS["samples"],
                )
                with gr.Accordion("Prompts", open=True):
                    add(PROMPT_OPTIONS)
                with gr.Accordion("Advanced", open=False):
                    add(ADVANCED_OPTIONS)
            with gr.Column():
                status = gr.Markdown("Upload an image and press Run.", elem_id=ELEMENT_IDS["status"])
                comparison = gr.ImageSlider(
                    label="Before (input enlarged, bicubic) / after",
                    type="filepath",
                    elem_id=ELEMENT_IDS["comparison"],
                )
                gallery = gr.Gallery(label="Samples", columns=4, height="auto", elem_id=ELEMENT_IDS["gallery"])
                files = gr.File(label="Download (PNG)", file_count="multiple", elem_id=ELEMENT_IDS["files"])
                tags = gr.Textbox(label="Tags (DAPE)", interactive=False, elem_id=ELEMENT_IDS["tags"])
                prompt = gr.Textbox(label="Full prompt", interactive=False, elem_id=ELEMENT_IDS["prompt"])

        def arm() -> tuple[float, str]:
            return time.monotonic(), "working: waiting for its turn, then tags, prompt and denoising"

        def upscale(request: Any, progress: Any = None, *values: Any) -> tuple[Any, ...]:
            image, armed, *options, samples_value = values
            session = getattr(request, "session_hash", None) or "api"
            started = armed if isinstance(armed, float) else 0.0
            return upscaler.run(image, tuple(options), samples_value, session, started, progress).outputs()

        def stop(request: Any) -> str:
            session = getattr(request, "session_hash", None) or "api"
            upscaler.cancels.cancel(session)
            # a running job ends at its next step: answer with its own final status, which would otherwise race
            # this answer to the page; a queued job is cancelled when its turn comes
            return upscaler.cancels.final_status(session, CANCEL_WAIT_S) or "cancelling: the job stops at its next step"

        def show(selected: Any, evt: Any) -> Any:
            index = getattr(evt, "index", 0) or 0
            return selected[index] if isinstance(selected, list) and 0 <= index < len(selected) else None

        # Gradio passes the request, the progress tracker and the selection to the leading positional
        # parameters it recognises by annotation or default; the lazy module's classes are only named now.
        upscale.__annotations__["request"] = gr.Request
        upscale.__defaults__ = (gr.Progress(),)
        stop.__annotations__["request"] = gr.Request
        show.__annotations__["evt"] = gr.SelectData

        inputs = [image, armed_at, *(widgets[name] for name in WIDGET_OPTIONS), samples]
        outputs = [comparison, gallery, files, tags, prompt, status, pairs]
        run.click(arm, outputs=[armed_at, status], queue=False, api_name=False).then(
            upscale, inputs=inputs, outputs=outputs, preprocess=False, api_name="upscale"
        )
        cancel.click(stop, outputs=[status], queue=False, api_name="cancel")
        gallery.select(show, inputs=[pairs], outputs=[comparison], queue=False, api_name=False)
    return page


@contextmanager
def server_folder() -> Iterator[Path]:
    """The one temporary folder of a server's files (Gradio's cache, uploads included, and the results),
    removed when the server stops: Ctrl-C, SIGTERM (handled here as Ctrl-C), or an error. Entered before
    Gradio is imported: it sets the environment that keeps Gradio offline and inside this folder."""
    folder = Path(tempfile.mkdtemp(prefix="seesr-ui-"))
    settings = {**OFFLINE_ENVIRONMENT, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield folder
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for name, value in before.items():  # as it was, for a caller that goes on (a test)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(pipe: SeeSRPipeline, settings: ServerSettings, work: Path) -> int:
    """Serve the page until Ctrl-C or SIGTERM, its files under ``work`` (a ``server_folder``); returns the
    exit status."""
    page = build_page(Upscaler(pipe, settings, work))
    page.queue(default_concurrency_limit=settings.concurrency)
    page.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        quiet=True,
        prevent_thread_lock=True,
        max_file_size=settings.max_file_size,
        enable_monitoring=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        show_error=False,
        app_kwargs={"middleware": [starlette_middleware.Middleware(RefuseRemoteFiles)]},
    )
    where = (
        "this machine only; --host 0.0.0.0 serves every network interface"
        if settings.host in ("127.0.0.1", "localhost", "::1")
        else "reachable from the network: anyone who can reach it can run jobs"
    )
    print(f"seesr ui: serving on http://{settings.host}:{settings.port} ({where}); Ctrl-C stops", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    print("seesr ui: stopped; temporary files removed", file=sys.stderr, flush=True)
    return 0
