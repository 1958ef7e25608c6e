"""The HTTP gateway: SAX-HTTP (ai-on-gke) and OpenAI-compatible endpoints in front of a cell.

Run it with `python -m gateway --port=8888`; embed it with `gateway.app.create_app(settings)`.
"""
