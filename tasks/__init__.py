"""seqio tasks for Spectron, importable as `spectron_tasks`.

Importing this package registers every task with seqio's TaskRegistry.
"""
