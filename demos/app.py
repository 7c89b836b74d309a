"""Gradio wiring for the two tabs; all decisions live in `vl_chat` and `prove`.

`build_app` only lays out components and connects events to the handlers of a `ChatEngine` (or a
notice when no VL model was loaded) and a `ProveService`. Launching, with its security defaults
(127.0.0.1, no share link), is `demos.cli`'s job.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from prover.prompts import STYLES

from .prove import DEFAULT_VARIANT, VARIANTS, GeneratorChoice, ProveReport, ProveService
from .vl_chat import ChatEngine, ChatSession, GenerationParams, chat_messages, latest_overlay

TITLE = "DeepSeek suite demos"
NO_VL_MODEL = (
    "No vision-language model is loaded. Restart with `--vl-model PATH` (a DeepSeek-VL or DeepSeek-VL2 "
    "checkpoint folder) or `--random-tiny-vl` (a small random-weight model that needs no download)."
)
PROMPT_HINT = (
    "Ask about the attached images (missing <image> tags are added for you). For boxes, write "
    "<|ref|>the object<|/ref|> or start with <|grounding|>."
)
VL_MODEL_LOCK = "vl-model"  # one generation at a time on the shared model


def build_app(chat: ChatEngine | None, prove: ProveService, openai_url: str = "", openai_model: str = "") -> gr.Blocks:
    """The Blocks app with the "Chat about images" and "Prove (Lean 4)" tabs."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}")
        with gr.Tab("Chat about images"):
            if chat is None:
                gr.Markdown(NO_VL_MODEL)
            else:
                _chat_tab(chat)
        with gr.Tab("Prove (Lean 4)"):
            _prove_tab(prove, openai_url, openai_model)
    return demo


def _chat_tab(chat: ChatEngine) -> None:
    gr.Markdown(f"**Model:** {chat.label}")
    state = gr.State(ChatSession())
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=520)
            text = gr.Textbox(label="Message", placeholder=PROMPT_HINT, lines=2)
            with gr.Row():
                send = gr.Button("Send", variant="primary", min_width=80)
                stop = gr.Button("Stop", variant="stop", min_width=80)
                regenerate = gr.Button("Regenerate", min_width=80)
                remove = gr.Button("Remove last turn", min_width=80)
                new = gr.Button("New conversation", min_width=80)
            status = gr.Markdown()
        with gr.Column(scale=2):
            files = gr.Files(label="Images for the next message", file_types=["image"])
            gallery = gr.Gallery(label="Preview", columns=3, height=180)
            overlay = gr.Image(label="Grounding overlay (boxes from the latest reply)", interactive=False, height=260)
            with gr.Accordion("Parameters", open=False):
                defaults = GenerationParams()
                params = [
                    gr.Slider(0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
                    gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                    gr.Slider(1, 4096, value=defaults.max_new_tokens, step=1, label="Max new tokens"),
                    gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
                    gr.Slider(128, 8192, value=defaults.max_history_tokens, step=64, label="Max history tokens"),
                ]

    def add(session: ChatSession, message: str, paths: list[str] | None):
        chat.add_turn(session, message, paths)
        return chat_messages(session), session, "", None, [], session.notice

    def stream(turns, session: ChatSession, *values: float):
        for s in turns(session, GenerationParams(*values)):
            yield chat_messages(s), s, latest_overlay(s), s.notice

    def answer(session: ChatSession, *values: float):
        yield from stream(chat.answer, session, *values)

    def again(session: ChatSession, *values: float):
        yield from stream(chat.regenerate, session, *values)

    def drop_last(session: ChatSession):
        chat.remove_last(session)
        return chat_messages(session), session, latest_overlay(session), session.notice

    def restart():
        return [], chat.new_conversation(), None, "", "", None, []

    added = [chatbot, state, text, files, gallery, status]
    shown = [chatbot, state, overlay, status]
    lock = {"concurrency_limit": 1, "concurrency_id": VL_MODEL_LOCK}
    streams = []
    for trigger in (send.click, text.submit):
        streams.append(
            trigger(add, [state, text, files], added, queue=False).then(answer, [state, *params], shown, **lock)
        )
    streams.append(regenerate.click(again, [state, *params], shown, **lock))
    stop.click(None, None, None, cancels=streams, queue=False)
    remove.click(drop_last, [state], shown, cancels=streams, queue=False)
    new.click(restart, None, [chatbot, state, overlay, status, text, files, gallery], cancels=streams, queue=False)
    files.change(chat.preview, [files], [gallery, status], queue=False)


def _report_outputs(report: ProveReport) -> tuple[str, gr.Dataframe, str]:
    table = pd.DataFrame(report.rows, columns=report.columns) if report.columns else pd.DataFrame()
    return report.markdown(), gr.Dataframe(value=table, visible=bool(report.columns)), report.code


def _prove_tab(prove: ProveService, openai_url: str, openai_model: str) -> None:
    gr.Markdown(prove.backend_status())
    paste_own = ("(none: use the theorem pasted below)", "")

    def choices(variant: str) -> list:
        return [paste_own, *prove.problems(variant)]

    with gr.Row():
        variant = gr.Dropdown(list(VARIANTS), value=DEFAULT_VARIANT, label="miniF2F statement set")
        problem = gr.Dropdown(choices(DEFAULT_VARIANT), value="", label="miniF2F problem", filterable=True)
    statement = gr.Code(label="Statement the proof is pinned to", language=None, interactive=False, lines=4)
    code = gr.Code(
        label="Your Lean 4 code: a whole theorem with its proof, a V2 sketch (have ... := by sorry), "
        "or only the tactic proof of the selected problem",
        language=None,
        interactive=True,
        lines=12,
    )
    with gr.Accordion("Generator for Prove", open=False):
        with gr.Row():
            kind = gr.Radio(["portfolio", "openai"], value="portfolio", label="Generator")
            attempts = gr.Slider(1, 32, value=8, step=1, label="Attempts")
        with gr.Row():
            base_url = gr.Textbox(
                value=openai_url, label="OpenAI-compatible endpoint URL", placeholder="http://127.0.0.1:8000/v1"
            )
            model = gr.Textbox(value=openai_model or GeneratorChoice.model, label="Model name")
            style = gr.Dropdown(list(STYLES), value=GeneratorChoice.style, label="Prompt style")
            max_tokens = gr.Slider(256, 32768, value=GeneratorChoice.max_tokens, step=256, label="Max tokens")
    with gr.Accordion("Decomposition of a V2 sketch", open=False), gr.Row():
        strategy = gr.Radio(["inline", "aux"], value="inline", label="Stitching")
        lemma_attempts = gr.Slider(1, 15, value=8, step=1, label="Portfolio attempts per subgoal")
    with gr.Row():
        verify = gr.Button("Verify", variant="primary")
        generate = gr.Button("Prove (generate + verify)")
        decompose = gr.Button("Decompose sketch")
        stop = gr.Button("Stop", variant="stop")
    verdict = gr.Markdown()
    table = gr.Dataframe(label="Attempts / subgoals", interactive=False, wrap=True, visible=False)
    checked = gr.Code(label="Checked file", language=None, interactive=False, lines=8)

    def on_variant(v: str):
        return gr.Dropdown(choices=choices(v), value=""), ""

    def on_verify(v: str, name: str, text: str):
        return _report_outputs(prove.verify(v, name, text))

    def on_prove(v, name, text, k, n, url, m, st, mt):
        for report in prove.prove(v, name, text, GeneratorChoice(k, url, m, st, int(mt)), int(n)):
            yield _report_outputs(report)

    def on_decompose(v: str, name: str, text: str, strat: str, n: float):
        # A generator, like on_prove: Stop closes it, which stops the decomposition's Lean work.
        for report in prove.decompose(v, name, text, strat, int(n)):
            yield _report_outputs(report)

    outputs = [verdict, table, checked]
    variant.change(on_variant, [variant], [problem, statement], queue=False)
    problem.change(prove.statement, [variant, problem], [statement], queue=False)
    runs = [
        verify.click(on_verify, [variant, problem, code], outputs),
        generate.click(on_prove, [variant, problem, code, kind, attempts, base_url, model, style, max_tokens], outputs),
        decompose.click(on_decompose, [variant, problem, code, strategy, lemma_attempts], outputs),
    ]
    stop.click(None, None, None, cancels=runs, queue=False)
