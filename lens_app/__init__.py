"""The Streamlit app's insides; `app.py` is its entry point (page setup, sidebar, routing).

One module per view (`lens_app.views`), each `render(ctx)` over one `Context`; session-state
keys from `lens_app.keys`; caches, slow runs and shared widgets in modules of their own. Like
`app.py`, it reaches the library through the `models` and `viz` front doors only, as module
attributes (`viz.analyze_images(...)`), so that a test's monkeypatch of the front door holds.
"""
