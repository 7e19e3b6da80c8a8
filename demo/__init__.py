"""The web demo: a gradio page for any run (``app.py``) and what a request means (``session.py``)."""
