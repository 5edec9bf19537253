"""lookalike.serving: the HTTP search API, its web page, a client, and how to run it.

``backend`` loads the served index and its model, ``swap`` follows the store's CURRENT
pointer and swaps versions atomically, ``engine`` and ``batcher`` micro-batch model
forwards and ScaNN searches, ``queries`` turns HTTP input into queries and results
into responses, ``app`` builds the FastAPI app (``admin`` and ``metrics`` add the
operator endpoints), ``server`` runs it under uvicorn, ``client`` talks to it.
"""
