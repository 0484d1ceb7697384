"""`iteralite serve`: an OpenAI-compatible completions server over any runtime (native C step by
default), with one runtime instance per worker slot, a bounded queue and a graceful drain.

protocol: request parsing and checking (400s naming the field) and the OpenAI response shapes.
engine:   the worker slots, the bounded admission and one completion run in a worker thread.
app:      the aiohttp application, streaming, disconnects and SIGTERM.
loadtest: `python -m iteralite.serve.loadtest`, a benchmark (not a test)."""
