"""The web demo: a gradio page for any run (``make demo RUN=runs/<name> [PORT=7860]``).

    python scripts/demo.py --run runs/world --port 7860

A prompt box, the target (text / picture / speech, or a reply mixing them as the model chooses), a picture upload
and a recording (upload or microphone); the sampling settings; the answer as a picture, a sound or a text (a reply:
all three), with the reranked candidates and their scores; progress while it works; readable messages for bad uploads.
What a request means is ``demo/session.py``.

The same app answers programmatic calls through gradio's client (``api_name="generate"``)::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    picture, sound, text, gallery, scores, message = client.predict(
        "two red circles", "picture", None, None, 1.0, 0.9, 2.0, 4, 0, "vq", "griffin_lim", api_name="/generate")
    # prompt, make, picture file, recording file, temperature, top-p, CFG scale, candidates, seed, picture decoder,
    # speech decoder (the last two may be left out: the defaults)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from anyloom.demo.session import TARGETS, DemoSession, Settings

# small pictures (the world's are 32x32) scale up as crisp pixels, not a blur
CSS = ("#status {min-height: 1.5em} "
       "#picture_out img, #gallery img, #picture_preview img {image-rendering: pixelated; object-fit: contain; "
       "width: 100%; height: 100%}")


def build_app(session: DemoSession) -> Any:
    """The gradio Blocks of the page (not launched)."""
    import gradio as gr

    d = session.defaults
    run_name = session.run.name or str(session.run)
    with gr.Blocks(title=f"anyloom · {run_name}", analytics_enabled=False) as app:
        gr.Markdown(f"# anyloom · `{run_name}`\nAny-to-any generation with the model in `{session.run}`: text, "
                    f"pictures and speech in, {' / '.join(session.targets)} out.", elem_id="header")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="two red circles", lines=2, elem_id="prompt")
                target = gr.Radio(session.targets, value="picture" if "picture" in session.targets else "text",
                                  label="Make", elem_id="target")
                with gr.Row():
                    # a file, not an image widget: a corrupt picture reaches the session, which says what is wrong
                    picture = gr.File(label="Picture (optional)", file_types=["image"], type="filepath",
                                      elem_id="picture_in")
                    preview = gr.Image(label="Your picture", type="pil", interactive=False, height=160,
                                       elem_id="picture_preview")
                picture_note = gr.Markdown("", elem_id="picture_note")  # what is wrong with an uploaded picture
                sound = gr.Audio(label="Speech (optional)", type="filepath", sources=["upload", "microphone"],
                                 elem_id="audio_in")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p")
                    cfg_scale = gr.Slider(1.0, 8.0, value=d.cfg_scale, step=0.25, label="CFG scale (picture, speech)")
                    candidates = gr.Slider(1, 16, value=d.candidates, step=1, label="Candidates (best one kept)")
                    seed = gr.Number(value=d.seed, precision=0, label="Seed")
                    decoder = gr.Radio(session.image_decoders, value=d.image_decoder, label="Picture decoder",
                                       visible=len(session.image_decoders) > 1, elem_id="image_decoder")
                    vocoder = gr.Radio(session.vocoders, value=d.vocoder, label="Speech decoder",
                                       visible=len(session.vocoders) > 1, elem_id="vocoder")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                status = gr.Markdown("", elem_id="status")
                first = target.value
                picture_out = gr.Image(label="Picture", type="pil", format="png", interactive=False, height=320,
                                       visible=first == "picture", elem_id="picture_out")  # png: as the model made it
                sound_out = gr.Audio(label="Speech", type="numpy", interactive=False, visible=first == "speech",
                                     elem_id="audio_out")
                text_out = gr.Textbox(label="Text", interactive=False, visible=first == "text", elem_id="text_out")
                gallery = gr.Gallery(label="Candidates (best first)", columns=4, height=240, format="png",
                                     object_fit="contain", visible=first == "picture", elem_id="gallery")
                scores = gr.Dataframe(headers=["candidate", "score"], label="Scores", interactive=False,
                                      elem_id="scores")

        def generate(prompt_text: str, make: str, picture_path: str | None, sound_path: str | None,
                     temp: float, p: float, scale: float, n: float, seed_value: float, image_decoder: str = "vq",
                     speech_decoder: str = "griffin_lim",
                     progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio reads it so)
            settings = Settings(temp, p, scale, int(n), int(seed_value or 0), image_decoder or "vq",
                                speech_decoder or "griffin_lim")
            total = _steps(session, make, settings)
            started = time.perf_counter()

            def on_step(event: Any) -> None:
                progress(min(1.0, (event.step + 1) / total), desc=f"{make}: token {event.step + 1}")

            out = session.answer(prompt_text, make, picture_path, sound_path, settings, on_step=on_step)
            took = f"{time.perf_counter() - started:.1f} s"
            message = out.message if out.refused else f"done in {took}" + (f" {out.message}" if out.message else "")
            rows = [[label, round(score, 3)] for label, score in out.scores]
            return out.picture, out.sound, out.text, out.gallery, rows, message

        picture.change(session.preview, [picture], [preview, picture_note])

        def outputs_for(make: str) -> tuple:
            reply = make == "reply"  # a mixed reply shows its text, its picture and its speech
            return (gr.update(visible=make == "picture" or reply), gr.update(visible=make == "speech" or reply),
                    gr.update(visible=make == "text" or reply), gr.update(visible=make == "picture"))

        target.change(outputs_for, [target], [picture_out, sound_out, text_out, gallery])
        inputs = [prompt, target, picture, sound, temperature, top_p, cfg_scale, candidates, seed, decoder, vocoder]
        button.click(generate, inputs,
                     [picture_out, sound_out, text_out, gallery, scores, status], api_name="generate")
    return app


def _steps(session: DemoSession, make: str, settings: Settings) -> int:
    """About how many decoding steps a request takes (for the progress bar): one pass per batch of candidates."""
    pipe, vocab = session.pipe, session.pipe.vocab
    picture = vocab.image_span_length + 1 if pipe.image_tokenizer is not None else 0
    speech = 0
    if pipe.audio_tokenizer is not None:
        frames = pipe.config.max_audio_seconds * float(pipe.audio_tokenizer.frame_rate)
        speech = int(frames * max(vocab.audio_num_codebooks, 1)) + 2
    if make == "picture":
        return picture
    if make == "speech" and speech:
        return speech
    if make == "reply":  # at most: its text, one picture and one utterance
        return pipe.config.max_text_tokens + picture + speech
    return pipe.config.max_text_tokens * (2 if settings.candidates > 1 else 1)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          block: bool = True) -> Any:
    """Load ``run``, build the page and serve it; returns the app (``block=False``: the server runs in a thread)."""
    import anyloom

    session = DemoSession(anyloom.load(run, device=device), run)
    return launch(build_app(session), host, port, block)


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve a built page (one request at a time: one model); ``block=False`` returns with the server running."""
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, css=CSS,
               inbrowser=False, quiet=True)
    return app


def main(argv: list[str] | None = None) -> int:
    from anyloom.generation.pipeline import PipelineError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/world", help="a run directory (or an export folder)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        print(f"anyloom demo: loading {a.run} ...", flush=True)
        serve(a.run, a.host, a.port, a.device, block=False)
    except (PipelineError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"anyloom demo: {a.run} at http://{a.host}:{a.port}/ (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


__all__ = ["TARGETS", "build_app", "launch", "serve", "main"]
