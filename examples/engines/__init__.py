"""From one box to many: the purchase example with its receipt handed to Celery or taskiq.

See ``examples/engines/README.md`` for the commands that run Redis, a worker and the app.
"""
