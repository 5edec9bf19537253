"""lookalike.serving: the HTTP search API, its web page, a client, and how to run it.

``backend`` loads the served index and its model, ``app`` builds the FastAPI app,
``server`` runs it under uvicorn, ``client`` talks to it.
"""
