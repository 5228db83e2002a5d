"""The `ragq` command line: the client commands, `ragq serve`'s supervisor and the embedded Redis.

Neither the API nor the workers import anything from here; the command line starts them as processes.
"""
