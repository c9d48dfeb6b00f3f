"""`msjax-serve`: the original MetaStone-S1 HTTP API (/generate, /score) on an msjax model.

    schema.py   request bodies, checked field by field (ApiError -> HTTP 4xx)
    backend.py  every call into generation and scoring (swap the decoding engine here)
    stops.py    text stop strings and the SPRM steps of a response cut short
    batcher.py  the queue between the HTTP handlers and the device worker thread
    app.py      the FastAPI routes, logging, timeouts
    process.py  the server in a subprocess (tests, benchmark)
The command line is `msjax.cli.serve`.
"""
