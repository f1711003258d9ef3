"""Benchmarks against real servers, each with the peer it measures against started in the
same run (``lastmile bench ...``). Imported only by the command line, lazily."""
