"""The OpenAI-compatible server (app.py), its decode engine (engine.py), its request rules (protocol.py) and
the playground's static files (static/)."""
