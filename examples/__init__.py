"""Runnable examples of after-response; each module's docstring says how to run it.

``local_servers`` holds what they share for running on one machine: an SMTP server that keeps
what it receives, HTTP receivers that answer as told, and uvicorn in the current event loop.
"""
