"""Gradio demos of the suite: chat about images (`vl`) and Lean 4 proving (`prover`) in one app.

Run `python -m demos --help`; see docs/demos.md. The handlers live in `demos.vl_chat` and
`demos.prove` and do not need a browser; `demos.app.build_app` wires them into Gradio.
"""
